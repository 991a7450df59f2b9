"""Compiler passes over the exported decode graph (torch.fx GraphModule), one pass per module.

Each pass is a torch.fx PassBase subclass; what a pass learns lives in node.meta["specontext"].
The pipeline order is the literal list in specontext_compiler/pipeline.py.
"""

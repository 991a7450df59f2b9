"""The specontext runtime: load a plan, bind weights, run the plan's decode graph.

Imports only torch, triton and the standard library (the GPU machine has no PuLP), and nothing
at import time touches CUDA.
"""

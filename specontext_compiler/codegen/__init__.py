"""Codegen: emit the plan directory (graph source, specialized Triton kernels, report)."""

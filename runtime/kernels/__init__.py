"""Triton kernels of the runtime, each beside its plain-PyTorch reference."""

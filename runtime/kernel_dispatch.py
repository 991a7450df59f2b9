"""Choose the kernels the step context calls: Triton on CUDA, the PyTorch references on CPU."""
from __future__ import annotations

import torch


def kernels_for(device: torch.device):
    """A Kernels object on CUDA, None on CPU (the step context then uses the references)."""
    if device.type != "cuda":
        return None
    from specontext_compiler.runtime.triton_kernels import TritonKernels
    return TritonKernels()

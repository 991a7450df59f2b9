"""Choose the kernels the step context calls: Triton on CUDA, the PyTorch references on CPU."""
from __future__ import annotations

import torch


def kernels_for(device: torch.device, plan=None):
    """TritonKernels on CUDA (the plan's specialized files if it has them), None on CPU."""
    if device.type != "cuda":
        return None
    from specontext_compiler.runtime.triton_kernels import TritonKernels
    modules = None
    if plan is not None and plan.kernels and plan.directory is not None:
        from specontext_compiler.runtime.kernel_loader import load_plan_kernels
        modules = load_plan_kernels(plan.directory, plan.kernels)
    return TritonKernels(modules)

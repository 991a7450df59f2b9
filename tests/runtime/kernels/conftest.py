"""Kernel tests run on the GPU when there is one (compiled Triton), else on CPU (interpreter)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _kernel_device():
    """Make tensor factories default to CUDA on a GPU machine, so every test exercises real kernels."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    yield
    torch.set_default_device(None)

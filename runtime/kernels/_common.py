"""Helpers shared by the kernel launchers: specialization checks and block-size arithmetic.

A kernel module's specialization block holds plan constants; 0 (or None) means "take it from the
inputs", which is what the templates in runtime/kernels/ ship with. A plan's copy (written by
specontext_compiler/codegen/emit_kernels.py) fixes them, and its launcher then refuses inputs of
another shape instead of silently compiling a new variant.
"""
from __future__ import annotations

import os

import torch

SPEC_BEGIN = "# --- specialization: begin ---"
SPEC_END = "# --- specialization: end ---"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Triton's CPU interpreter (set before any @triton.jit runs, as the tests do): its 16-bit
# arithmetic is wrong, so kernels with a tensor-core dot take an fp32 path there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int) -> int:
    """Smallest power of two >= n (at least 1); Triton block shapes must be powers of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def check_fixed(module: str, name: str, fixed, actual) -> None:
    """Assert that an input matches the plan constant `name` (no check when fixed is 0/None)."""
    if fixed in (0, None):
        return
    assert fixed == actual, (f"{module}: this copy is specialized to {name}={fixed!r}, "
                             f"got {actual!r}; recompile the plan for this shape")


def check_dtype(module: str, fixed: str | None, tensor: torch.Tensor) -> None:
    """Assert the tensor's dtype is the plan's (fixed is a name from DTYPES or None)."""
    if fixed:
        check_fixed(module, "DTYPE", DTYPES[fixed], tensor.dtype)
    else:
        assert tensor.dtype in DTYPES.values(), f"{module}: unsupported dtype {tensor.dtype}"


def row_major(tensor: torch.Tensor, name: str) -> None:
    """Assert the last dimension is contiguous (each row is loaded as one vector)."""
    assert tensor.stride(-1) == 1, f"{name} must have a contiguous last dimension"

"""The gated MLP's activation in one kernel: silu(gate) * up (two nodes of the unfused graph).

silu(gate) is rounded to gate's dtype before the product, as the unfused silu's output is; the
product is rounded to the result type of the two. gate and up are read as rows of their last
dimension, each with its own row stride: with merged projections (passes/merge_projections.py)
they are the two halves of one [.., 2I] GEMM output, strided views that are read in place, not
copied. One program per (row, block of a row).

Bytes moved per call: gate and up read, the output written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024      # elements per program: a decode step's [B, 14336] is 14 programs a request


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The unfused graph's ops (the specification, and the CPU implementation)."""
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate, up: [..., N] of one shape, any strides (rows of N read in place when
    the last dimension is contiguous and the leading ones collapse into one row stride)."""
    assert gate.shape == up.shape, f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ"
    out = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    if not out.numel():
        return out
    width = gate.shape[-1]
    gate_rows, up_rows = _rows(gate, width), _rows(up, width)
    _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(width, BLOCK))](
        gate_rows, up_rows, out, width, gate_rows.stride(0), up_rows.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as [rows, width] with a contiguous last dimension: a view where the strides allow."""
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_row_stride, up_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    activated = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)

"""The gated MLP's activation in one kernel: silu(gate) * up (two nodes of the unfused graph).

silu(gate) is rounded to gate's dtype before the product, as the unfused silu's output is; the
product is rounded to the result type of the two. Elementwise over contiguous copies of the inputs.

Bytes moved per call: gate and up read, the output written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024      # elements per program: a decode step's [B, 14336] is ~100 programs


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The unfused graph's ops (the specification, and the CPU implementation)."""
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    assert gate.shape == up.shape, f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ"
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    if out.numel():
        _silu_mul_kernel[(triton.cdiv(out.numel(), BLOCK),)](gate, up, out, out.numel(), BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    activated = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)

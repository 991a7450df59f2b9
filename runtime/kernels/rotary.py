"""Rotary position embedding (the rotate-half form) in one kernel: one node instead of five a tensor.

  rotary(x [B, H, T, D], cos, sin) -> x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin

cos and sin broadcast to x (Llama's are [B, 1, T, D]: one angle per position, shared by the heads).
The unfused graph runs mul, neg, cat, mul and add, each rounding to the result type; the kernel
rounds both products and the sum the same way, so on the GPU its output equals the graph's.
x may be a strided view (the graph's q and k are transposed views of the projections): the output
has x's strides, as the elementwise ops' outputs do. One program per (request, position), all
heads at once.

Bytes moved per call: x read and the output written once, cos and sin read once per position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import pow2, row_major


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The unfused graph's ops, in its order (the specification, and the CPU implementation)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    batch, heads, steps, dim = x.shape
    assert dim % 2 == 0, f"rotary: head dim {dim} is odd"
    row_major(x, "rotary: x")
    cos, sin = (_broadcast(t, x) for t in (cos, sin))
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    if out.numel():
        half = dim // 2
        _rotary_kernel[(batch * steps,)](
            x, cos, sin, out, heads, steps, half,
            *x.stride()[:3], *cos.stride()[:3], *sin.stride()[:3], *out.stride()[:3],
            BLOCK_H=pow2(heads), BLOCK_HALF=pow2(half), num_warps=4)
    return out


def _broadcast(angles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos/sin expanded to x's shape (stride 0 where they broadcast), last dimension contiguous."""
    if angles.stride(-1) != 1:
        angles = angles.contiguous()
    return angles.expand(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, steps, half,
                   x_sb, x_sh, x_st, c_sb, c_sh, c_st, s_sb, s_sh, s_st, o_sb, o_sh, o_st,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // steps).to(tl.int64)
    t = (pid % steps).to(tl.int64)
    h = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (d < half)
    x_row = x_ptr + b * x_sb + t * x_st + h * x_sh + d
    first = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    c_row = cos_ptr + b * c_sb + t * c_st + h * c_sh + d
    s_row = sin_ptr + b * s_sb + t * s_st + h * s_sh + d
    cos_first = tl.load(c_row, mask=mask, other=0.0).to(tl.float32)
    cos_second = tl.load(c_row + half, mask=mask, other=0.0).to(tl.float32)
    sin_first = tl.load(s_row, mask=mask, other=0.0).to(tl.float32)
    sin_second = tl.load(s_row + half, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # each product rounded to the output type before the sum, as the unfused mul, mul, add do
    out_first = ((first * cos_first).to(dtype).to(tl.float32)
                 + (-second * sin_first).to(dtype).to(tl.float32)).to(dtype)
    out_second = ((second * cos_second).to(dtype).to(tl.float32)
                  + (first * sin_second).to(dtype).to(tl.float32)).to(dtype)
    o_row = out_ptr + b * o_sb + t * o_st + h * o_sh + d
    tl.store(o_row, out_first, mask=mask)
    tl.store(o_row + half, out_second, mask=mask)

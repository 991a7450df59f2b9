"""RMSNorm in one kernel, optionally with the residual add before it (the fused graph's norms).

The captured Llama-family graph spends eight small kernels on each RMSNorm (cast, pow, mean, add,
rsqrt, mul, cast, mul) and one more on the residual add before it; at decode batch sizes each
kernel moves a few KB, so their launches, not their bytes, cost ~0.1 ms a layer. The compiler's
FuseElementwise pass puts one `specontext::rms_norm` (or `add_rms_norm`) node in their place.

  rms_norm(x [..., N], weight [N], eps, dtype) -> weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
  add_rms_norm(a, b, weight, eps, dtype) -> (s = a + b, rms_norm(s, weight, eps, dtype))

with x32 = x in float32: the order of casts is the Hugging Face LlamaRMSNorm's, so the fused kernel
rounds where the unfused graph rounds (the normalized value to `dtype`, the product to the result
type of weight and dtype, the sum to a's dtype). One program per row; N up to 64K.

Bytes moved per call: x (and b) read, the output (and the sum) written, the weight read per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import pow2

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The unfused graph's ops, in its order (the specification, and the CPU implementation)."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


def add_rms_norm_reference(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    total = a + b
    return total, rms_norm_reference(total, weight, eps, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return _launch(x, None, weight, eps, dtype)[1]


def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    assert a.shape == b.shape, f"add_rms_norm: a {tuple(a.shape)} and b {tuple(b.shape)} differ"
    return _launch(a, b, weight, eps, dtype)


def out_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The result type of `weight * normed.to(dtype)`."""
    return torch.promote_types(weight.dtype, dtype)


def _launch(x, other, weight, eps, dtype):
    width = x.shape[-1]
    assert weight.shape == (width,), f"rms_norm: weight {tuple(weight.shape)} for rows of {width}"
    assert width <= 65536, f"rms_norm: rows of {width} exceed one program's block"
    rows_x = x.contiguous().view(-1, width)
    total = None
    if other is not None:
        rows_other = other.contiguous().view(-1, width)
        total = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, other.dtype), device=x.device)
    out = torch.empty(x.shape, dtype=out_dtype(weight, dtype), device=x.device)
    if rows_x.shape[0]:
        _rms_norm_kernel[(rows_x.shape[0],)](
            rows_x, rows_other if other is not None else rows_x, weight.contiguous(), out,
            total if total is not None else out, width, float(eps),
            HAS_OTHER=other is not None, CAST=_TL_DTYPES[dtype], BLOCK_N=pow2(width),
            num_warps=_warps(width))
    return total, out


def _warps(width: int) -> int:
    """Enough threads that each holds ~8 elements of a row (a 4096 row: 16 warps of 32)."""
    return max(1, min(16, pow2(width) // 256))


@triton.jit
def _rms_norm_kernel(x_ptr, other_ptr, w_ptr, out_ptr, sum_ptr, width, eps,
                     HAS_OTHER: tl.constexpr, CAST: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    offsets = row * width + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_OTHER:
        # the sum is rounded to its stored type first: the norm reads what the residual keeps
        total = (x.to(tl.float32) + tl.load(other_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        total = total.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, total, mask=mask)
        x = total
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / width
    normed = (x32 * tl.math.rsqrt(mean_square + eps)).to(CAST).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)

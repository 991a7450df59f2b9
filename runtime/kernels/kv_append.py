"""Append T new tokens' K/V to a head-major cache at per-request offsets (paper s.5, s.6).

Shapes: cache_k [B_max, Hkv, S_max, D], cache_v [B_max, Hkv, S_max, Dv] (a view over the request
slots of this forward; only the last dimension needs to be contiguous); k_new [B, Hkv, T, D],
v_new [B, Hkv, T, Dv]; start [B] int32/int64: tokens already cached per request.

On CUDA the cache is either device memory (resident layers) or pinned host memory (offloaded
layers): the kernel writes host rows directly through unified virtual addressing, so no staging
copy is needed. Rows that would land at or past S_max are dropped rather than written out of
bounds (the launcher cannot check start + T <= S_max without a host sync).

Bytes moved per call: read B*Hkv*T*(D+Dv)*b, write the same; see kv_append_bytes().
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import check_dtype, check_fixed, pow2, row_major
from specontext_compiler.runtime.kernels._program import request_and_head

# --- specialization: begin ---
HEAD_DIM = 0          # D (0: from the inputs)
V_HEAD_DIM = 0        # Dv
NUM_KV_HEADS = 0      # Hkv
DTYPE = None          # cache dtype name, e.g. "bfloat16"
BLOCK_T = 0           # tokens per program (0: chosen by _block_tokens)
# --- specialization: end ---


def kv_append_reference(cache_k: torch.Tensor, cache_v: torch.Tensor | None, k_new: torch.Tensor,
                        v_new: torch.Tensor | None, start: torch.Tensor) -> None:
    """Write k_new/v_new [B, Hkv, T, D] into the caches at start[b] .. start[b]+T-1 (in place)."""
    steps, seq_max = k_new.shape[2], cache_k.shape[2]
    for b in range(k_new.shape[0]):
        first = int(start[b])
        take = max(0, min(steps, seq_max - first))   # the kernel drops rows past S_max too
        cache_k[b, :, first:first + take].copy_(k_new[b, :, :take])
        if cache_v is not None:
            cache_v[b, :, first:first + take].copy_(v_new[b, :, :take])


def kv_append_bytes(k_new: torch.Tensor, v_new: torch.Tensor | None = None) -> int:
    """Bytes read plus written: every new row is read once and written once."""
    total = k_new.numel() * k_new.element_size()
    if v_new is not None:
        total += v_new.numel() * v_new.element_size()
    return 2 * total


def _block_tokens(steps: int, block_d: int) -> int:
    """Tokens per program: all of a decode step, up to ~8K elements for prefill chunks."""
    if BLOCK_T:
        return BLOCK_T
    return max(1, min(pow2(steps), 8192 // block_d))


@triton.jit
def _kv_append_kernel(ck_ptr, cv_ptr, k_ptr, v_ptr, start_ptr,
                      num_kv_heads, steps, seq_max,
                      ck_sb, ck_sh, ck_ss, cv_sb, cv_sh, cv_ss,
                      k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, HAS_V: tl.constexpr):
    pid = tl.program_id(0)
    b, h = request_and_head(pid, num_kv_heads)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = tl.load(start_ptr + b).to(tl.int64) + t
    rows_ok = (t < steps) & (pos < seq_max)
    d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (d[None, :] < D)
    rows = tl.load(k_ptr + b * k_sb + h * k_sh + t[:, None] * k_st + d[None, :], mask=mask)
    tl.store(ck_ptr + b * ck_sb + h * ck_sh + pos[:, None] * ck_ss + d[None, :], rows, mask=mask)
    if HAS_V:
        dv = tl.arange(0, BLOCK_DV)
        mask_v = rows_ok[:, None] & (dv[None, :] < DV)
        rows_v = tl.load(v_ptr + b * v_sb + h * v_sh + t[:, None] * v_st + dv[None, :], mask=mask_v)
        tl.store(cv_ptr + b * cv_sb + h * cv_sh + pos[:, None] * cv_ss + dv[None, :], rows_v, mask=mask_v)


def kv_append(cache_k: torch.Tensor, cache_v: torch.Tensor | None, k_new: torch.Tensor,
              v_new: torch.Tensor | None, start: torch.Tensor) -> None:
    """Triton version of kv_append_reference; pass cache_v = v_new = None for a K-only cache."""
    batch, heads, steps, dim = k_new.shape
    has_v = cache_v is not None
    tensors = [("cache_k", cache_k), ("k_new", k_new)] + ([("cache_v", cache_v), ("v_new", v_new)] if has_v else [])
    for name, tensor in tensors:
        row_major(tensor, name)
        assert tensor.dtype == cache_k.dtype, f"{name} is {tensor.dtype}, cache is {cache_k.dtype}"
    check_dtype(__name__, DTYPE, cache_k)
    check_fixed(__name__, "HEAD_DIM", HEAD_DIM, dim)
    check_fixed(__name__, "NUM_KV_HEADS", NUM_KV_HEADS, heads)
    assert cache_k.shape[1] == heads and cache_k.shape[3] == dim and cache_k.shape[0] >= batch
    assert start.dtype in (torch.int32, torch.int64) and start.shape == (batch,)
    dim_v = v_new.shape[-1] if has_v else dim
    if has_v:
        check_fixed(__name__, "V_HEAD_DIM", V_HEAD_DIM, dim_v)
        assert v_new.shape[:3] == k_new.shape[:3] and cache_v.shape[3] == dim_v
    cv, vn = (cache_v, v_new) if has_v else (cache_k, k_new)
    block_d, block_dv = pow2(dim), pow2(dim_v)
    block_t = _block_tokens(steps, max(block_d, block_dv))
    grid = (batch * heads, triton.cdiv(steps, block_t))
    _kv_append_kernel[grid](
        cache_k, cv, k_new, vn, start, heads, steps, cache_k.shape[2],
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cv.stride(0), cv.stride(1), cv.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
        D=dim, DV=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_T=block_t, HAS_V=has_v)

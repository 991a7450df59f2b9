"""Sparse decode attention over the selected KV rows, GQA-aware (paper s.1.4, s.4.3).

Shapes: q [B, Hq, D]; k_src [B, Hkv, N, D], v_src [B, Hkv, N, Dv] (the full cache, N = S_max, or an
offloaded layer's budget buffer, N = W); idx [B, G, W] int32 rows of N (-1 = skip; G = Hkv: one
set per KV head, G = 1: one set for all heads of the request); k_new [B, Hkv, D],
v_new [B, Hkv, Dv]: the current token, always attended. Output [B, Hq, Dv] in q's dtype.

Flash-decoding split: each (request, KV head) has NUM_SPLITS programs, each over a chunk of idx,
so a batch-1 decode still fills the GPU. A program reads each selected K/V row once and uses it
for all Hq/Hkv query heads of that KV head. Partials (running max, sum, unnormalized output) go
to fp32 scratch; _combine_kernel merges them with the new token and normalizes.

Bytes moved per call ~ B*Hkv*W*(D+Dv)*b (selected rows) + idx + q/out; see sparse_decode_bytes().
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import INTERPRETED, cdiv, check_dtype, check_fixed, pow2, row_major
from specontext_compiler.runtime.kernels._program import load_query_group, request_and_head

# --- specialization: begin ---
HEAD_DIM = 0          # D (0: from the inputs)
V_HEAD_DIM = 0        # Dv
GQA_GROUP = 0         # query heads per KV head
WIDTH = 0             # W: selected rows per group
BLOCK_W = 0           # rows per inner step (0: chosen by _config)
NUM_SPLITS = 0        # programs per (request, KV head) (0: chosen by _config)
DTYPE = None          # "bfloat16", "float16" or "float32"
# --- specialization: end ---

_TARGET_PROGRAMS = 264   # ~2 waves of an H100's 132 SMs
# The split kernel's launch: Triton's defaults (4 warps, its default pipeline depth);
# benchmarks/bench_sparse_decode.py sweeps these with _TARGET_PROGRAMS on the GPU.
_SPLIT_WARPS = 4
_SPLIT_STAGES = None     # None: Triton's default
# Tensor-core path (tl.dot): compiled GPUs only; the interpreter computes bf16 wrongly, so CPU
# tests run the fp32 CUDA-core kernel below, and the GPU tests check this one against the reference.
_TENSOR_CORES = not INTERPRETED
_DOT_BLOCK_W = 64


def sparse_decode_reference(q, k_src, v_src, idx, k_new, v_new, scaling: float) -> torch.Tensor:
    """Gather the selected rows, append the new token, softmax in fp32. Returns [B, Hq, Dv]."""
    batch, num_heads, dim = q.shape
    num_kv_heads = k_src.shape[1]
    group = num_heads // num_kv_heads
    rows = idx.long().expand(batch, num_kv_heads, idx.shape[-1])
    valid = rows >= 0
    safe = rows.clamp(min=0).unsqueeze(-1)
    k_sel = torch.gather(k_src, 2, safe.expand(-1, -1, -1, k_src.shape[-1])).float()   # read W*D
    v_sel = torch.gather(v_src, 2, safe.expand(-1, -1, -1, v_src.shape[-1])).float()   # read W*Dv
    k_all = torch.cat([k_sel, k_new.float().unsqueeze(2)], dim=2)
    v_all = torch.cat([v_sel, v_new.float().unsqueeze(2)], dim=2)
    keep = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
    qg = q.float().view(batch, num_kv_heads, group, dim)
    logits = torch.einsum("bhgd,bhwd->bhgw", qg, k_all) * scaling
    logits = logits.masked_fill(~keep.unsqueeze(2), float("-inf"))
    out = torch.einsum("bhgw,bhwd->bhgd", logits.softmax(-1), v_all)
    return out.reshape(batch, num_heads, -1).to(q.dtype)


def sparse_decode_bytes(q, k_src, v_src, idx) -> int:
    """Bytes a call moves at least: every selected row of K and V once, idx, q and the output."""
    batch, num_kv_heads = q.shape[0], k_src.shape[1]
    rows = batch * num_kv_heads * idx.shape[-1]
    kv = rows * (k_src.shape[-1] + v_src.shape[-1]) * k_src.element_size()
    return kv + idx.numel() * 4 + 2 * q.numel() * q.element_size()


def _config(batch_heads: int, width: int, group: int, block_d: int) -> tuple[int, int]:
    """(BLOCK_W, NUM_SPLITS): keep the [group, BLOCK_W, D] product near 8K fp32 registers' worth,
    and split W until the grid has about two waves of programs."""
    block_w = BLOCK_W or max(4, min(64, pow2(width), 8192 // (pow2(group) * block_d)))
    blocks = cdiv(width, block_w)
    splits = NUM_SPLITS or max(1, min(blocks, cdiv(_TARGET_PROGRAMS, batch_heads)))
    return block_w, splits


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr,
                  num_kv_heads, width, chunk, scaling,
                  q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, i_sb, i_sh,
                  GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_W: tl.constexpr,
                  USE_DOT: tl.constexpr):
    # USE_DOT: both products on tensor cores (native dtype in, fp32 out; BLOCK_G padded to 16);
    # otherwise fp32 on CUDA cores, which is also what the interpreter computes correctly.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b, h = request_and_head(pid, num_kv_heads)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = load_query_group(q_ptr, b, h, q_sb, q_sh, GROUP, D, BLOCK_G, BLOCK_D)
    if not USE_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    lo = split * chunk
    for w0 in range(lo, lo + chunk, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        rows = tl.load(idx_ptr + b * i_sb + h * i_sh + w, mask=w < width, other=-1).to(tl.int64)
        ok = rows >= 0
        k = tl.load(k_ptr + b * k_sb + h * k_sh + rows[:, None] * k_sn + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + rows[:, None] * v_sn + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k)) * scaling                                # [BLOCK_G, BLOCK_W]
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scaling
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a chunk of padding only
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    part = (pid * num_splits + split) * BLOCK_G + g                          # scratch row
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * BLOCK_DV + dv[None, :], acc)



@triton.jit
def _combine_kernel(q_ptr, kn_ptr, vn_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
                    num_kv_heads, num_splits, scaling,
                    q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh, o_sb, o_sh,
                    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                    HAS_NEW: tl.constexpr):
    pid = tl.program_id(0)
    b, h = request_and_head(pid, num_kv_heads)
    g = tl.arange(0, BLOCK_G)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    part = (pid * num_splits + sp[None, :]) * BLOCK_G + g[:, None]           # [BLOCK_G, BLOCK_S]
    sp_ok = sp[None, :] < num_splits
    m = tl.load(m_ptr + part, mask=sp_ok, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=sp_ok, other=0.0)
    m_all = tl.max(m, axis=1)
    if HAS_NEW:   # the current token is a split of its own, holding one row
        d = tl.arange(0, BLOCK_D)
        q = load_query_group(q_ptr, b, h, q_sb, q_sh, GROUP, D, BLOCK_G, BLOCK_D).to(tl.float32)
        k_new = tl.load(kn_ptr + b * kn_sb + h * kn_sh + d, mask=d < D).to(tl.float32)
        s_new = tl.sum(q * k_new[None, :], axis=1) * scaling
        m_all = tl.maximum(m_all, s_new)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    scale = tl.exp(m - m_safe[:, None])                                      # [BLOCK_G, BLOCK_S]
    denom = tl.sum(l * scale, axis=1)
    out = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for s_i in range(0, num_splits):
        row = (pid * num_splits + s_i) * BLOCK_G + g
        m_s = tl.load(m_ptr + row)
        acc = tl.load(acc_ptr + row[:, None] * BLOCK_DV + dv[None, :])
        out += acc * tl.exp(m_s - m_safe)[:, None]
    if HAS_NEW:
        p_new = tl.exp(s_new - m_safe)
        v_new = tl.load(vn_ptr + b * vn_sb + h * vn_sh + dv, mask=dv < DV).to(tl.float32)
        out += p_new[:, None] * v_new[None, :]
        denom += p_new
    out = out / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(o_ptr + b * o_sb + (h * GROUP + g)[:, None] * o_sh + dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (dv[None, :] < DV))


def sparse_decode(q, k_src, v_src, idx, k_new, v_new, scaling: float) -> torch.Tensor:
    """Triton version of sparse_decode_reference (same arguments, same result)."""
    batch, num_heads, dim = q.shape
    num_kv_heads, dim_v, width = k_src.shape[1], v_src.shape[-1], idx.shape[-1]
    group = num_heads // num_kv_heads
    for name, t in (("q", q), ("k_src", k_src), ("v_src", v_src), ("k_new", k_new), ("v_new", v_new)):
        row_major(t, name)
    check_dtype(__name__, DTYPE, k_src)
    assert q.dtype == k_src.dtype == v_src.dtype == k_new.dtype == v_new.dtype
    assert idx.dtype == torch.int32 and idx.stride(-1) == 1, "idx must be int32, last dim contiguous"
    assert num_heads == group * num_kv_heads and idx.shape[1] in (1, num_kv_heads)
    assert k_src.shape[0] >= batch and idx.shape[0] == batch and k_new.shape == (batch, num_kv_heads, dim)
    for name, fixed, actual in (("HEAD_DIM", HEAD_DIM, dim), ("V_HEAD_DIM", V_HEAD_DIM, dim_v),
                                ("GQA_GROUP", GQA_GROUP, group), ("WIDTH", WIDTH, width)):
        check_fixed(__name__, name, fixed, actual)
    block_g, block_d, block_dv = pow2(group), pow2(dim), pow2(dim_v)
    use_dot = _TENSOR_CORES and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and min(block_d, block_dv) >= 16
    if use_dot:
        block_g = max(16, block_g)
        block_w = _DOT_BLOCK_W
        splits = NUM_SPLITS or max(1, min(cdiv(width, block_w), cdiv(_TARGET_PROGRAMS, batch * num_kv_heads)))
    else:
        block_w, splits = _config(batch * num_kv_heads, width, group, max(block_d, block_dv))
    chunk = cdiv(cdiv(width, splits), block_w) * block_w
    partials = batch * num_kv_heads * splits * block_g
    m = torch.empty(partials, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((partials, block_dv), dtype=torch.float32, device=q.device)
    idx_head_stride = idx.stride(1) if idx.shape[1] == num_kv_heads else 0   # G = 1: shared set
    _split_kernel[(batch * num_kv_heads, splits)](
        q, k_src, v_src, idx, m, l, acc, num_kv_heads, width, chunk, scaling,
        q.stride(0), q.stride(1), k_src.stride(0), k_src.stride(1), k_src.stride(2),
        v_src.stride(0), v_src.stride(1), v_src.stride(2), idx.stride(0), idx_head_stride,
        GROUP=group, D=dim, DV=dim_v, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_W=block_w, USE_DOT=use_dot, num_warps=_SPLIT_WARPS,
        **({"num_stages": _SPLIT_STAGES} if _SPLIT_STAGES else {}))
    out = torch.empty((batch, num_heads, dim_v), dtype=q.dtype, device=q.device)
    _combine_kernel[(batch * num_kv_heads,)](
        q, k_new, v_new, m, l, acc, out, num_kv_heads, splits, scaling,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, D=dim, DV=dim_v, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_S=pow2(splits), HAS_NEW=True)
    return out

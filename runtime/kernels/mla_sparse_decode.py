"""Sparse decode for MLA: attend over selected latents, up-project only those (paper s.1.4, Fig. 5e).

Shapes: q_nope [B, H, dn], q_rope [B, H, dr]; latent cache c [B, S, r] and RoPE key cache
kr [B, S, dr] (shared by all heads); idx [B, H, W] int32 per head (-1 = skip); w_uk [H, dn, r],
w_uv [H, dv, r] (k_nope = w_uk @ c, v = w_uv @ c per head). Output [B, H, dv] in q's dtype.

The kernel uses the absorbed form: q_lat = q_nope @ w_uk per head (tiny, done in torch), scores
are q_lat . c + q_rope . kr over the gathered rows, the weighted sum stays in latent space and is
up-projected once by w_uv at the end. The new token is not passed separately: it must already be
in the cache and in idx (selection forces the recent window, which contains it). Each row of
idx needs at least one valid entry (the sink is always selected).

Bytes moved per call ~ B*H*W*(r+dr)*b (gathered latents per head) + weights read by the two
einsums; see mla_sparse_decode_bytes().
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import cdiv, check_dtype, check_fixed, pow2, row_major
from specontext_compiler.runtime.kernels._program import request_and_head
from specontext_compiler.runtime.kernels.sparse_decode import _combine_kernel

# --- specialization: begin ---
LATENT_DIM = 0        # r (kv_lora_rank; 0: from the inputs)
ROPE_DIM = 0          # dr
WIDTH = 0             # W
BLOCK_W = 0           # rows per inner step (0: chosen by _config)
NUM_SPLITS = 0        # programs per (request, head) (0: chosen by _config)
DTYPE = None
# --- specialization: end ---

_TARGET_PROGRAMS = 264


def mla_sparse_decode_reference(q_nope, q_rope, c, kr, idx, w_uk, w_uv, scaling: float) -> torch.Tensor:
    """Gather the selected latents per head, up-project them explicitly, softmax in fp32."""
    batch, heads, _ = q_nope.shape
    rows = idx.long()
    valid = rows >= 0
    safe = rows.clamp(min=0)
    flat = safe.reshape(batch, -1, 1)
    c_sel = torch.gather(c.float(), 1, flat.expand(-1, -1, c.shape[-1])).view(batch, heads, -1, c.shape[-1])
    kr_sel = torch.gather(kr.float(), 1, flat.expand(-1, -1, kr.shape[-1])).view(batch, heads, -1, kr.shape[-1])
    k_nope = torch.einsum("bhwr,hnr->bhwn", c_sel, w_uk.float())
    v = torch.einsum("bhwr,hvr->bhwv", c_sel, w_uv.float())
    logits = (torch.einsum("bhn,bhwn->bhw", q_nope.float(), k_nope)
              + torch.einsum("bhd,bhwd->bhw", q_rope.float(), kr_sel)) * scaling
    logits = logits.masked_fill(~valid, float("-inf"))
    return torch.einsum("bhw,bhwv->bhv", logits.softmax(-1), v).to(q_nope.dtype)


def mla_sparse_decode_bytes(c, kr, idx, w_uk, w_uv) -> int:
    """Bytes a call moves at least: the gathered latent and RoPE rows, idx and both weights."""
    rows = idx.shape[0] * idx.shape[1] * idx.shape[2]
    gathered = rows * (c.shape[-1] + kr.shape[-1]) * c.element_size()
    weights = (w_uk.numel() + w_uv.numel()) * w_uk.element_size()
    return gathered + idx.numel() * 4 + weights


def _config(batch_heads: int, width: int, block_r: int) -> tuple[int, int]:
    """(BLOCK_W, NUM_SPLITS), as in sparse_decode._config with one query head per program."""
    block_w = BLOCK_W or max(4, min(64, pow2(width), 8192 // block_r))
    splits = NUM_SPLITS or max(1, min(cdiv(width, block_w), cdiv(_TARGET_PROGRAMS, batch_heads)))
    return block_w, splits


@triton.jit
def _mla_split_kernel(ql_ptr, qr_ptr, c_ptr, kr_ptr, idx_ptr, m_ptr, l_ptr, acc_ptr,
                      heads, width, chunk, scaling,
                      ql_sb, ql_sh, qr_sb, qr_sh, c_sb, c_ss, kr_sb, kr_ss, i_sb, i_sh,
                      R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DR: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, h = request_and_head(pid, heads)
    r = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    q_lat = tl.load(ql_ptr + b * ql_sb + h * ql_sh + r, mask=r < R, other=0.0).to(tl.float32)
    q_rope = tl.load(qr_ptr + b * qr_sb + h * qr_sh + dr, mask=dr < DR, other=0.0).to(tl.float32)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    lo = split * chunk
    for w0 in range(lo, lo + chunk, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        rows = tl.load(idx_ptr + b * i_sb + h * i_sh + w, mask=w < width, other=-1).to(tl.int64)
        ok = rows >= 0
        lat = tl.load(c_ptr + b * c_sb + rows[:, None] * c_ss + r[None, :],
                      mask=ok[:, None] & (r[None, :] < R), other=0.0).to(tl.float32)
        rope = tl.load(kr_ptr + b * kr_sb + rows[:, None] * kr_ss + dr[None, :],
                       mask=ok[:, None] & (dr[None, :] < DR), other=0.0).to(tl.float32)
        s = (tl.sum(lat * q_lat[None, :], axis=1) + tl.sum(rope * q_rope[None, :], axis=1)) * scaling
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)                                                # [BLOCK_W]
        acc = acc * alpha + tl.sum(p[:, None] * lat, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    part = pid * tl.num_programs(1) + split
    tl.store(m_ptr + part + tl.arange(0, 1), m_i)
    tl.store(l_ptr + part + tl.arange(0, 1), l_i)
    tl.store(acc_ptr + part * BLOCK_R + r, acc)


def mla_sparse_decode(q_nope, q_rope, c, kr, idx, w_uk, w_uv, scaling: float) -> torch.Tensor:
    """Triton version of mla_sparse_decode_reference (absorbed form; same result)."""
    batch, heads, _ = q_nope.shape
    latent, rope, width = c.shape[-1], kr.shape[-1], idx.shape[-1]
    for name, t in (("q_rope", q_rope), ("c", c), ("kr", kr)):
        row_major(t, name)
    check_dtype(__name__, DTYPE, c)
    assert q_nope.dtype == q_rope.dtype == c.dtype == kr.dtype
    assert idx.dtype == torch.int32 and idx.stride(-1) == 1 and idx.shape[:2] == (batch, heads)
    assert w_uk.shape[0] == heads and w_uk.shape[2] == latent and w_uv.shape[2] == latent
    for name, fixed, actual in (("LATENT_DIM", LATENT_DIM, latent), ("ROPE_DIM", ROPE_DIM, rope),
                                ("WIDTH", WIDTH, width)):
        check_fixed(__name__, name, fixed, actual)
    q_lat = torch.einsum("bhn,hnr->bhr", q_nope.float(), w_uk.float()).contiguous()
    block_r = pow2(latent)
    block_w, splits = _config(batch * heads, width, block_r)
    chunk = cdiv(cdiv(width, splits), block_w) * block_w
    partials = batch * heads * splits
    m = torch.empty(partials, dtype=torch.float32, device=c.device)
    l = torch.empty_like(m)
    acc = torch.empty((partials, block_r), dtype=torch.float32, device=c.device)
    _mla_split_kernel[(batch * heads, splits)](
        q_lat, q_rope, c, kr, idx, m, l, acc, heads, width, chunk, scaling,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        c.stride(0), c.stride(1), kr.stride(0), kr.stride(1), idx.stride(0), idx.stride(1),
        R=latent, DR=rope, BLOCK_R=block_r, BLOCK_DR=pow2(rope), BLOCK_W=block_w)
    out_lat = torch.empty((batch, heads, latent), dtype=torch.float32, device=c.device)
    _combine_kernel[(batch * heads,)](
        out_lat, out_lat, out_lat, m, l, acc, out_lat, heads, splits, scaling,
        0, 0, 0, 0, 0, 0, out_lat.stride(0), out_lat.stride(1),
        GROUP=1, D=latent, DV=latent, BLOCK_G=1, BLOCK_D=block_r, BLOCK_DV=block_r,
        BLOCK_S=pow2(splits), HAS_NEW=False)
    return torch.einsum("bhr,hvr->bhv", out_lat, w_uv.float()).to(q_nope.dtype)

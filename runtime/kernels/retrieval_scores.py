"""The retrieval head's scores and the token selection they drive (paper s.1.3-1.4, s.4.2-4.3).

retrieval_scores: q [B, Hq, D] (the new token's queries), k_cache [B, Hkv, S_max, D] (the head's
own K cache), seq_lens [B] int32/int64 -> per-group weights [B, G, S_max] fp32: softmax over the
valid positions per query head, then the element-wise max over the query heads of each group
(G = Hkv: per KV head; G = 1: MQA / batch level; a draft head with a multiple of the LLM's
groups merges consecutive KV heads). Positions >= seq_len get weight 0, and select()
never picks them. Same numbers as selection.group_scores(selection.attention_weights(...)).

Two passes: (1) one program per (request, KV head, block of S) reads each K row once for all its
query heads (a tl.dot of the group's queries, padded to 16 rows, with the block's keys), writes
the logits and a per-block (max, sum of exp); the blocks' partials are merged into a log-sum-exp
per head with a few torch ops; (2) one program per (request, group, block) normalizes and takes
the max over the group's heads.

select: top-k per group with sinks and the recent window forced, as selection.select_tokens. The
top-k itself is torch.topk on the scores (capture-safe on the GPU, no host sync).

Bytes moved per call ~ B*Hkv*S*D*b (K) + 2*B*Hq*S*4 (logits) + B*G*S*4 (weights).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specontext_compiler.runtime.kernels._common import (INTERPRETED, cdiv, check_dtype, check_fixed, pow2,
                                                         row_major)
from specontext_compiler.runtime.kernels._program import load_query_group, request_and_head

# --- specialization: begin ---
HEAD_DIM = 0          # D of the retrieval head (0: from the inputs)
GQA_GROUP = 0         # query heads per KV head
GROUPS = 0            # G: index sets per request
WIDTH = 0             # W = budget + sinks + recent
BLOCK_S = 0           # positions per program (0: chosen by _block_positions)
DTYPE = None
# --- specialization: end ---


def retrieval_scores_reference(q, k_cache, seq_lens, scaling: float, groups: int) -> torch.Tensor:
    """Per-group weights [B, G, S_max] fp32 from selection.py (the specification)."""
    from specontext_compiler.runtime import selection
    weights = selection.attention_weights(q, k_cache, scaling, seq_lens=seq_lens)
    return selection.group_scores(weights, groups)       # G consecutive runs of Hq / G heads


def retrieval_scores_bytes(q, k_cache, groups: int) -> int:
    """Bytes a call moves: K once, the fp32 logits written and read, the weights written."""
    batch, num_heads, _ = q.shape
    seq = k_cache.shape[2]
    return (batch * k_cache.shape[1] * seq * k_cache.shape[3] * k_cache.element_size()
            + 2 * batch * num_heads * seq * 4 + batch * groups * seq * 4)


def _block_rows(group: int) -> int:
    """Query rows of the dot: the group, padded to tl.dot's minimum of 16."""
    return max(16, pow2(group))


def _block_positions(block_g: int, seq: int) -> int:
    """Positions per program: a [BLOCK_G, BLOCK_S] fp32 tile of at most 4K values."""
    return BLOCK_S or max(16, min(256, pow2(seq), 4096 // block_g))


@triton.jit
def _logits_kernel(q_ptr, k_ptr, len_ptr, logit_ptr, m_ptr, l_ptr,
                   num_kv_heads, seq_max, num_blocks, scaling, q_sb, q_sh, k_sb, k_sh, k_ss,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FP32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    b, h = request_and_head(pid, num_kv_heads)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    pos = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    seq_len = tl.load(len_ptr + b)
    ok = pos < seq_len
    q = load_query_group(q_ptr, b, h, q_sb, q_sh, GROUP, D, BLOCK_G, BLOCK_D)
    k = tl.load(k_ptr + b * k_sb + h * k_sh + pos[:, None].to(tl.int64) * k_ss + d[None, :],
                mask=ok[:, None] & (d[None, :] < D), other=0.0)
    # A dot, not a broadcast product summed over D: the sum's cross-thread reduction makes this
    # kernel compute-bound at 16 positions a program (4.1 ms for 1.9 GB of K on an H100). 16-bit
    # inputs go to the tensor cores with fp32 accumulation (exact products); the interpreter and
    # fp32 caches use an exact fp32 dot (the interpreter's 16-bit arithmetic is not to be trusted).
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    s = s * scaling                                                          # [BLOCK_G, BLOCK_S]
    s = tl.where(ok[None, :], s, float("-inf"))
    head = b * num_kv_heads * GROUP + h * GROUP + g                            # flat (b, q head)
    tl.store(logit_ptr + head[:, None] * seq_max + pos[None, :], s,
             mask=(g[:, None] < GROUP) & (pos[None, :] < seq_max))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
    tl.store(m_ptr + head * num_blocks + blk, m, mask=g < GROUP)
    tl.store(l_ptr + head * num_blocks + blk, l, mask=g < GROUP)


@triton.jit
def _group_max_kernel(logit_ptr, lse_ptr, out_ptr, num_groups, seq_max,
                      HEADS_PER_GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)                                                   # flat (b, group)
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    hh = tl.arange(0, BLOCK_H)
    head = pid.to(tl.int64) * HEADS_PER_GROUP + hh                           # flat (b, q head)
    head_ok = hh < HEADS_PER_GROUP
    lse = tl.load(lse_ptr + head, mask=head_ok, other=0.0)
    mask = head_ok[:, None] & (pos[None, :] < seq_max)
    s = tl.load(logit_ptr + head[:, None] * seq_max + pos[None, :], mask=mask, other=float("-inf"))
    p = tl.where(s == float("-inf"), 0.0, tl.exp(s - lse[:, None]))
    tl.store(out_ptr + pid.to(tl.int64) * seq_max + pos, tl.max(p, axis=0), mask=pos < seq_max)


def retrieval_scores(q, k_cache, seq_lens, scaling: float, groups: int) -> torch.Tensor:
    """Triton version of retrieval_scores_reference: [B, G, S_max] fp32."""
    batch, num_heads, dim = q.shape
    num_kv_heads, seq_max = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    row_major(q, "q")
    row_major(k_cache, "k_cache")
    check_dtype(__name__, DTYPE, k_cache)
    assert q.dtype == k_cache.dtype and num_heads == group * num_kv_heads
    assert num_kv_heads % groups == 0 and k_cache.shape[0] >= batch and k_cache.shape[3] == dim
    assert seq_lens.dtype in (torch.int32, torch.int64) and seq_lens.shape == (batch,)
    for name, fixed, actual in (("HEAD_DIM", HEAD_DIM, dim), ("GQA_GROUP", GQA_GROUP, group),
                                ("GROUPS", GROUPS, groups)):
        check_fixed(__name__, name, fixed, actual)
    block_g, block_d = _block_rows(group), pow2(dim)
    block_s = _block_positions(block_g, seq_max)
    num_blocks = cdiv(seq_max, block_s)
    logits = torch.empty((batch, num_heads, seq_max), dtype=torch.float32, device=q.device)
    part_m = torch.empty((batch, num_heads, num_blocks), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _logits_kernel[(batch * num_kv_heads, num_blocks)](
        q, k_cache, seq_lens, logits, part_m, part_l, num_kv_heads, seq_max, num_blocks, scaling,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, D=dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_S=block_s,
        FP32_DOT=INTERPRETED or k_cache.dtype == torch.float32)
    m = part_m.amax(dim=-1, keepdim=True)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse = (m_safe + (part_l * (part_m - m_safe).exp()).sum(-1, keepdim=True).log()).squeeze(-1)
    out = torch.empty((batch, groups, seq_max), dtype=torch.float32, device=q.device)
    per_group = num_heads // groups
    block_s2 = max(16, min(1024, pow2(seq_max), 8192 // pow2(per_group)))
    _group_max_kernel[(batch * groups, cdiv(seq_max, block_s2))](
        logits, lse.contiguous(), out, groups, seq_max,
        HEADS_PER_GROUP=per_group, BLOCK_H=pow2(per_group), BLOCK_S=block_s2)
    return out


def select(scores: torch.Tensor, seq_lens: torch.Tensor, budget: int, sink_tokens: int = 1,
           recent_tokens: int = 0) -> torch.Tensor:
    """Selected positions [B, G, W] int32, ascending, -1 padded (as selection.select_tokens).

    scores: [B, G, S] fp32 per-group weights; seq_lens: [B] valid length per request.
    The top-k is torch.topk, in selection.select_from_groups (the specification itself: the
    step after scoring has no kernel of its own). No host sync, static shapes.
    """
    from specontext_compiler.runtime import selection
    check_fixed(__name__, "WIDTH", WIDTH, budget + sink_tokens + recent_tokens)
    return selection.select_from_groups(scores, budget, sink_tokens, recent_tokens, seq_lens)

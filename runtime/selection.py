"""Token selection from retrieval-head attention, as the paper defines it (s.4.2-4.3).

This module is the specification the Triton kernels and the eval compare against.

  scores [B, Hq, S]: the retrieval head's attention weights (post-softmax, per query head) of the
  new token over the S cached tokens.

  head level  MHA / MLA: a top-k per head (G = Hq groups)
              GQA: element-wise max over the query heads of each KV group, then a top-k per KV
                   head (G = Hkv groups)
              MQA: max over all heads, one top-k (G = 1)
  batch level one shared set per request: max over all heads, one top-k (G = 1); the paper shows
              this is worse, the eval measures by how much.

Always kept: the first `sink_tokens` positions (attention sinks; token 0 by default) and the last
`recent_tokens` positions. The budget counts the tokens chosen beyond those. The output has a
fixed width W = sink_tokens + recent_tokens + budget (static shapes for CUDA graphs), sorted
ascending, padded with -1 when the context is shorter than W.
"""
from __future__ import annotations

import torch

LEVELS = ("head", "batch")


def selection_groups(num_heads: int, num_kv_heads: int, level: str = "head") -> int:
    """Number of independent index sets per request (G)."""
    if level == "batch" or num_kv_heads == 1:
        return 1
    return num_kv_heads


def selection_width(budget: int, sink_tokens: int, recent_tokens: int) -> int:
    """W: indices per group, including sinks and the recent window."""
    return budget + sink_tokens + recent_tokens


def group_scores(scores: torch.Tensor, num_kv_heads: int, level: str = "head") -> torch.Tensor:
    """Reduce per-head scores [B, Hq, S] to per-group scores [B, G, S] (element-wise max)."""
    if level not in LEVELS:
        raise ValueError(f"selection level {level!r} is not one of {LEVELS}")
    batch, num_heads, seq = scores.shape
    groups = selection_groups(num_heads, num_kv_heads, level)
    return scores.reshape(batch, groups, num_heads // groups, seq).amax(dim=2)


def select_tokens(scores: torch.Tensor, num_kv_heads: int, budget: int, *, sink_tokens: int,
                  recent_tokens: int, level: str = "head",
                  seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, G, W] (int64, ascending, -1 padded) of the tokens each group attends to.

    scores: [B, Hq, S] float, attention weights over S cached positions.
    seq_lens: [B] valid cached length per request (positions >= seq_len are ignored); default S.
    """
    per_group = group_scores(scores.float(), num_kv_heads, level)          # [B, G, S]
    return select_from_groups(per_group, budget, sink_tokens, recent_tokens, seq_lens).long()


def select_from_groups(per_group: torch.Tensor, budget: int, sink_tokens: int, recent_tokens: int,
                       seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, G, W] int32 (ascending, -1 padded) from per-group scores [B, G, S].

    Static shapes and no host sync, so the Triton path calls it inside a CUDA graph too.
    """
    batch, groups, seq = per_group.shape
    width = selection_width(budget, sink_tokens, recent_tokens)
    positions = torch.arange(seq, device=per_group.device).view(1, 1, seq)
    if seq_lens is None:
        seq_lens = torch.full((batch,), seq, dtype=torch.long, device=per_group.device)
    lens = seq_lens.to(device=per_group.device, dtype=torch.int64).view(batch, 1, 1)
    valid = positions < lens
    forced = valid & ((positions < sink_tokens) | (positions >= lens - recent_tokens))
    # Forced tokens rank above every scored one; invalid positions below everything.
    ranked = per_group.float().masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    top = ranked.topk(min(width, seq), dim=-1).indices
    top = torch.where(top < lens, top, torch.full_like(top, seq)).sort(dim=-1).values   # invalid last
    top = torch.where(top == seq, torch.full_like(top, -1), top).to(torch.int32)
    if top.shape[-1] < width:
        pad = torch.full((batch, groups, width - top.shape[-1]), -1, dtype=torch.int32, device=top.device)
        top = torch.cat([top, pad], dim=-1)
    return top


def attention_weights(q: torch.Tensor, k_cache: torch.Tensor, scaling: float,
                      seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Retrieval-head attention weights [B, Hq, S] of one new query over a K cache.

    q: [B, Hq, D]; k_cache: [B, Hkv, S, D] (GQA: each KV head serves Hq/Hkv query heads).
    """
    batch, num_heads, dim = q.shape
    num_kv_heads, seq = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    qg = q.float().reshape(batch, num_kv_heads, group, dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, k_cache.float()).reshape(batch, num_heads, seq) * scaling
    if seq_lens is not None:
        positions = torch.arange(seq, device=q.device).view(1, 1, seq)
        logits = logits.masked_fill(positions >= seq_lens.to(q.device).view(batch, 1, 1), float("-inf"))
    return logits.softmax(dim=-1)

"""Token-selection methods compared by the eval, each as a keep-mask over the cached context.

A mask is bool [B, G, S] over the S context positions before the new token (the new token is always
attended); G divides the LLM's query heads (G = 1: shared by all heads). Every method keeps the
same number of tokens per group, W = sink + recent + budget, so they are compared at equal cost:

  full        everything (the reference)
  spec-head   retrieval head + selection.select_tokens, head level (paper s.4.2-4.3)
  spec-batch  retrieval head + selection.select_tokens, batch level (one shared set)
  streaming   StreamingLLM: the sink tokens + the most recent W - sink tokens
  quest       Quest-style pages of `page_size`: per-page min/max keys, the LLM's own query at each
              layer scores each page by its upper bound, top W // page_size pages (oracle-like)
  random      the sink and recent tokens + `budget` uniformly random others
SpeContext, streaming and random choose once per step for all layers; quest chooses per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specontext_compiler.runtime import selection

METHODS = ("full", "spec-head", "spec-batch", "streaming", "quest", "random")
PER_LAYER = ("quest",)


def indices_to_mask(indices: torch.Tensor, seq: int) -> torch.Tensor:
    """Indices [B, G, W] (-1 padded) to a keep-mask [B, G, seq]."""
    mask = torch.zeros(*indices.shape[:2], seq + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, seq, indices), True)
    return mask[..., :seq]


def spec_mask(head_q: torch.Tensor, head_k: torch.Tensor, *, scaling: float, kv_groups: int, budget: int,
              sink: int, recent: int, level: str) -> torch.Tensor:
    """SpeContext selection from the retrieval head: head_q [B, Hq, D], head_k [B, Hkv, S, D] -> [B, G, S]."""
    scores = selection.attention_weights(head_q, head_k, scaling)
    indices = selection.select_tokens(scores, kv_groups, budget, level=level, sink_tokens=sink,
                                      recent_tokens=recent)
    return indices_to_mask(indices, head_k.shape[2])


def streaming_mask(seq: int, width: int, sink: int, device=None) -> torch.Tensor:
    """StreamingLLM: first `sink` + last `width - sink` positions, [1, 1, seq]."""
    positions = torch.arange(seq, device=device)
    return ((positions < sink) | (positions >= seq - (width - sink))).view(1, 1, seq)


def random_mask(seq: int, budget: int, sink: int, recent: int, generator: torch.Generator) -> torch.Tensor:
    """Sink + recent window + `budget` uniformly random other positions, [1, 1, seq]."""
    positions = torch.arange(seq)
    mask = (positions < sink) | (positions >= seq - recent)
    free = (~mask).nonzero().flatten()
    pick = free[torch.randperm(free.numel(), generator=generator)[:budget]]
    mask[pick] = True
    return mask.view(1, 1, seq)


def quest_mask(query: torch.Tensor, keys: torch.Tensor, width: int, page_size: int = 16) -> torch.Tensor:
    """Quest pages from the LLM's own query: query [B, Hq, D], keys [B, Hkv, S, D] -> [B, Hkv, S].

    Each page's score is the upper bound sum_d max(q_d * kmin_d, q_d * kmax_d) (Quest, Tang et al.
    2024); GQA takes the max bound over a group's query heads, then the top width // page_size pages.
    """
    batch, num_heads, dim = query.shape
    num_kv, seq = keys.shape[1], keys.shape[2]
    pages = -(-seq // page_size)
    padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, pages * page_size - seq), value=float("nan"))
    paged = padded.view(batch, num_kv, pages, page_size, dim)
    kmin, kmax = paged.nan_to_num(float("inf")).amin(3), paged.nan_to_num(float("-inf")).amax(3)
    q = query.float().view(batch, num_kv, num_heads // num_kv, 1, dim)
    bound = torch.maximum(q * kmin.unsqueeze(2), q * kmax.unsqueeze(2)).sum(-1).amax(2)   # [B, Hkv, pages]
    top = bound.topk(min(max(width // page_size, 1), pages), dim=-1).indices
    page_keep = torch.zeros(batch, num_kv, pages, dtype=torch.bool, device=keys.device)
    page_keep.scatter_(-1, top, True)
    return page_keep.repeat_interleave(page_size, dim=-1)[..., :seq]


def expand_to_heads(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, S] -> [B, Hq, S]: each group's set serves its Hq / G consecutive query heads."""
    return mask.repeat_interleave(num_heads // mask.shape[1], dim=1)


@dataclass(frozen=True)
class Budget:
    """Tokens each method may keep per group: W = sink + recent + budget (Quest: W in pages)."""

    budget: int
    sink: int = 1
    recent: int = 0
    page_size: int = 16

    @property
    def width(self) -> int:
        return selection.selection_width(self.budget, self.sink, self.recent)


def method_mask(method: str, limit: Budget, *, query, keys, head_q, head_k, head,
                generator: torch.Generator) -> torch.Tensor | None:
    """Keep-mask [B, G, S] of `method` for one step (None = dense).

    query [B, Hq, D] / keys [B, Hkv, S, D]: the LLM's at this layer (quest only);
    head_q [B, Hq, D] / head_k [B, Hkv, S, D]: the retrieval head's (spec-* only).
    """
    seq = keys.shape[2] if keys is not None else head_k.shape[2]
    if method == "full" or seq <= limit.width:
        return None
    if method in ("spec-head", "spec-batch"):
        return spec_mask(head_q, head_k, scaling=head.scaling, kv_groups=head.selection_kv_heads,
                         budget=limit.budget, sink=limit.sink, recent=limit.recent, level=method[5:])
    if method == "streaming":
        return streaming_mask(seq, limit.width, limit.sink)
    if method == "random":
        return random_mask(seq, limit.budget, limit.sink, limit.recent, generator)
    if method == "quest":
        return quest_mask(query, keys, limit.width, limit.page_size)
    raise ValueError(f"unknown method {method!r}")

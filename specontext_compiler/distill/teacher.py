"""The teacher signal: which keys the LLM attends to, at sampled query positions (paper Eq. 2).

One dense forward per sequence with a capture hook on every layer's post-RoPE q and k gives, at P
query positions, each layer's softmax attention per query head. Selection never picks the sink
token 0 or the recent window (both are always attended), so each row is renormalized over the
selectable keys only; the teacher aggregates the layers, renormalized again: "mean" (default) is
what attention recall averages, so its top-k maximises recall; "max" says a key matters if any
layer needs it, since one selection serves them all (lower recall on SmolLM2 at budgets
256-1024). `layers` restricts the aggregate to some of the LLM's layers (e.g. the ones that read
far context, where a passkey is looked up). The same forward yields the hidden states that a fused head reads (`feature_layers`,
HF output_hidden_states indices). Stored in fp16.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from specontext_compiler.errors import SpecontextError
from specontext_compiler.eval import sparse_attention


@dataclass
class TeacherSample:
    """One sequence: ids [T], query positions [P], teacher [Hq, P, T] (rows sum to 1 over the
    selectable keys, zero elsewhere), features [T, F*H] (the LLM's hidden states at each position)."""

    ids: torch.Tensor
    positions: torch.Tensor
    teacher: torch.Tensor
    features: torch.Tensor


def selectable_keys(positions: torch.Tensor, seq_len: int, recent: int) -> torch.Tensor:
    """[P, T] bool: keys a query at each position can select (not token 0, not the last `recent`)."""
    keys = torch.arange(seq_len)[None, :]
    return (keys >= 1) & (keys < positions[:, None] - recent + 1)


def query_positions(seq_len: int, count: int, must: list[int], recent: int, min_context: int,
                    seed: int) -> torch.Tensor:
    """Sorted query positions: every `must` position that has min_context selectable keys, and
    random others up to `count`."""
    first = recent + min_context
    if first >= seq_len:
        raise SpecontextError(f"sequences of {seq_len} tokens leave no query with {min_context} selectable "
                              f"keys before the recent window of {recent}; use a longer sequence")
    kept = sorted({p for p in must if first <= p < seq_len})
    taken = set(kept)
    pool = [p for p in range(first, seq_len) if p not in taken]
    extra = random.Random(seed).sample(pool, max(0, min(count - len(kept), len(pool))))
    return torch.tensor(sorted(kept + extra))


AGGREGATES = ("mean", "max")


class _LayerAggregate:
    """Capture hook: the running sum or max over layers of renormalized attention at the queries."""

    def __init__(self, positions: torch.Tensor, seq_len: int, recent: int, num_heads: int, aggregate: str,
                 layers: frozenset[int] | None = None):
        self.aggregate, self.layers = aggregate, layers
        self.positions = positions
        self.allowed = selectable_keys(positions, seq_len, recent)
        self.causal = torch.arange(seq_len)[None, :] <= positions[:, None]
        self.total = torch.zeros(num_heads, len(positions), seq_len)

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        q = query[0, :, self.positions].float()                                   # [Hq, P, D]
        k = key[0].float().repeat_interleave(q.shape[0] // key.shape[1], dim=0)   # [Hq, T, D]
        logits = torch.einsum("hpd,htd->hpt", q, k) * q.shape[-1] ** -0.5
        weights = logits.masked_fill(~self.causal, float("-inf")).softmax(-1) * self.allowed
        if self.aggregate == "max":
            torch.maximum(self.total, _renormalize(weights), out=self.total)
        else:                      # a sum renormalizes to the mean
            self.total.add_(_renormalize(weights))

    def teacher(self) -> torch.Tensor:
        return _renormalize(self.total * self.allowed)


def _renormalize(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def collect(model, ids: torch.Tensor, positions: torch.Tensor, feature_layers: tuple[int, ...],
            recent: int, aggregate: str = "mean", layers: tuple[int, ...] | None = None) -> TeacherSample:
    """Run `model` densely over ids [T] once: the teacher at `positions` (over `layers`, default
    all) and the features."""
    seq_len = len(ids)
    if int(positions.min()) <= recent:
        raise SpecontextError(f"query position {int(positions.min())} has no selectable key "
                              f"(recent window {recent})")
    if aggregate not in AGGREGATES:
        raise SpecontextError(f"teacher aggregate {aggregate!r}: choose one of {AGGREGATES}")
    hook = _LayerAggregate(positions, seq_len, recent, model.config.num_attention_heads, aggregate,
                           frozenset(layers) if layers is not None else None)
    previous = getattr(model.config, "_attn_implementation", None)
    sparse_attention.install(model)
    try:
        with sparse_attention.active(capture=hook):
            out = model(input_ids=ids[None], use_cache=False, logits_to_keep=1, output_hidden_states=True)
    finally:
        if previous and previous != sparse_attention.ATTN_NAME:
            model.set_attn_implementation(previous)
    features = torch.cat([out.hidden_states[i][0] for i in feature_layers], dim=-1)
    return TeacherSample(ids=ids.clone(), positions=positions, teacher=hook.teacher().half(),
                         features=features.half())

"""Attention recall: the share of the LLM's attention mass that a method's selection keeps (paper s.4.2).

One dense prefill of long text captures every layer's post-RoPE q (at a few query positions) and
k (all positions). For a query at position t, each method selects over positions 0..t-1 as if t
were a decode step; recall at layer l is sum over the selected tokens (plus t itself, always
attended) of the LLM's softmax weights, averaged over query heads and query positions. The
weights come from dense-context hidden states, so this measures selection alone, not drift.
A fused (EAGLE-3 style) head reads the LLM's hidden states of the same prefill (`context_qk`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specontext_compiler.eval import sparse_attention
from specontext_compiler.eval.methods import PER_LAYER, Budget, expand_to_heads, method_mask


def query_positions(length: int, count: int) -> list[int]:
    """`count` positions spread evenly over the second half of the text (long contexts only)."""
    start = length // 2
    return [start + (length - 1 - start) * i // max(count - 1, 1) for i in range(count)]


@dataclass
class Captured:
    """One dense prefill: per layer (q [Hq, P, D] at the query positions, k [Hkv, T, D]), and the
    LLM's hidden states (HF's output_hidden_states tuple), which fused heads read."""

    qk: dict[int, tuple[torch.Tensor, torch.Tensor]]
    hidden: tuple


@torch.no_grad()
def capture_qk(model, ids: torch.Tensor, positions: list[int]) -> Captured:
    """Every layer's q at `positions` and k, and the hidden states, from one dense prefill of ids [1, T]."""
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    index = torch.tensor(positions)

    def grab(layer, query, key):
        qk[layer] = (query[0, :, index].float(), key[0].float())

    sparse_attention.install(model)
    with sparse_attention.active(capture=grab):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return Captured(qk, out.hidden_states)


def context_qk(head, ids: torch.Tensor, hidden_states=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's q, k for a whole context ids [1, T]; a fused head reads the LLM's hidden states."""
    previous = None
    if getattr(head, "fused", False):
        if hidden_states is None:
            raise ValueError(f"{getattr(head, 'source', 'the head')} is fused: pass the LLM's hidden states")
        previous = head.shift_features(head.features_of(hidden_states))
    return head.project(ids, torch.arange(ids.shape[1])[None], previous)


@torch.no_grad()
def attention_recall(model, head, ids: list[int], *, budgets, methods, sink: int = 1, recent: int = 0,
                     queries: int = 16, page_size: int = 16, seed: int = 0,
                     progress: Callable[[], None] | None = None,
                     captured: Captured | None = None) -> dict[str, dict[int, list[float]]]:
    """method -> budget -> recall per layer (mean over heads and query positions), for ids of long text.

    captured: capture_qk's result for these ids and query positions, to share one prefill between heads.
    """
    tokens = torch.tensor([ids])
    positions = query_positions(len(ids), queries)
    captured = captured if captured is not None else capture_qk(model, tokens, positions)
    head_q, head_k = context_qk(head, tokens, captured.hidden)
    num_layers = len(captured.qk)
    sums = {m: {b: [0.0] * num_layers for b in budgets} for m in methods}
    generator = torch.Generator().manual_seed(seed)
    for j, t in enumerate(positions):
        weights = [_llm_weights(*captured.qk[layer], j, t) for layer in range(num_layers)]   # [Hq, t+1] each
        for method in methods:
            for budget in budgets:
                limit = Budget(budget, sink, recent, page_size)
                shared = None
                for layer in range(num_layers):
                    if shared is None or method in PER_LAYER:
                        q, k = captured.qk[layer]
                        shared = method_mask(method, limit, query=q[None, :, j], keys=k[None, :, :t],
                                             head_q=head_q[:, :, t], head_k=head_k[:, :, :t], head=head,
                                             generator=generator)
                    sums[method][budget][layer] += _kept_mass(weights[layer], shared)
        if progress:
            progress()
    return {m: {b: [s / len(positions) for s in per_layer] for b, per_layer in by_budget.items()}
            for m, by_budget in sums.items()}


def _llm_weights(q: torch.Tensor, k: torch.Tensor, j: int, t: int) -> torch.Tensor:
    """Softmax weights [Hq, t+1] of query j (position t) over keys 0..t (GQA: keys shared by groups)."""
    num_heads, num_kv = q.shape[0], k.shape[0]
    keys = k[:, : t + 1].repeat_interleave(num_heads // num_kv, 0)
    logits = torch.einsum("hd,hsd->hs", q[:, j], keys) * q.shape[-1] ** -0.5
    return logits.softmax(-1)


def _kept_mass(weights: torch.Tensor, keep: torch.Tensor | None) -> float:
    """Mean over heads of the weight on kept context tokens plus the new token."""
    if keep is None:
        return 1.0
    per_head = expand_to_heads(keep, weights.shape[0])[0]                  # [Hq, t]
    kept = (weights[:, :-1] * per_head).sum(-1) + weights[:, -1]
    return float(kept.mean())

"""Why a head misses the passkey: where the key's digits rank in its scores, and which LLM layers read them.

One passkey prompt (context + question) is prefilled densely. For the question's last token, each
head scores the context as head-level selection does (max over a KV group's query heads); we report
the worst rank of the key's digit tokens per KV group (the selection keeps ranks below its budget).
Beside it, the LLM's own softmax weight on those digits per layer, averaged over query heads, and
their worst rank under the layer-mean attention (what `specontext distill` fits a head to).

    .venv/bin/python -m specontext_compiler.eval.needle [length] [depth] [head ...]
"""
from __future__ import annotations

import sys

import torch

from specontext_compiler.eval.prefix_head import make_head
from specontext_compiler.eval.recall import _llm_weights, capture_qk, context_qk
from specontext_compiler.eval.text import NEEDLE, passkey, passkey_prompt
from specontext_compiler.runtime import selection


def key_positions(tokenizer, context: list[int], key: str) -> list[int]:
    """Positions of the key's digit tokens inside the needle sentence of `context`."""
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
    start = next(i for i in range(len(context)) if context[i:i + len(needle)] == needle)
    return [i for i in range(start, start + len(needle)) if tokenizer.decode([context[i]]).strip().isdigit()]


def distance_histogram(grouped: torch.Tensor, budget: int, bin_tokens: int = 1024) -> list[list[int]]:
    """Per group, how many of its top-`budget` positions fall in each bin of `bin_tokens` positions:
    an even spread, or clusters where the head's RoPE phases align."""
    top = grouped.topk(min(budget, grouped.shape[-1]), dim=-1).indices
    bins = -(-grouped.shape[-1] // bin_tokens)
    return [torch.bincount(row // bin_tokens, minlength=bins).tolist() for row in top]


@torch.no_grad()
def needle_ranks(model, tokenizer, heads, *, length: int = 8192, depth: float = 0.5, seed: int = 7,
                 budget: int = 2048) -> dict:
    """{"heads": name -> worst digit rank per KV group, "selected_per_1024": name -> per group the
    top-`budget` positions per 1024-token bin, "llm_share": per-layer weight on the digits,
    "llm_mean_worst_rank": the digits' worst rank under the layer-mean attention}."""
    key = passkey(seed)
    context, question = passkey_prompt(tokenizer, length - 8, depth, key)
    ids = torch.tensor([context + question])
    last, digits = ids.shape[1] - 1, key_positions(tokenizer, context, key)
    captured = capture_qk(model, ids, [last])
    out = {"length": length, "depth": depth, "digits": len(digits), "heads": {}, "llm_share": []}
    for name in heads:
        head = make_head(model, name)
        q, k = context_qk(head, ids, captured.hidden)
        scores = selection.attention_weights(q[:, :, -1], k[:, :, :-1], head.scaling)[0]    # [Hq, S]
        grouped = selection.group_scores(scores[None], head.selection_kv_heads)[0]           # [G, S]
        ranks = grouped.argsort(-1, descending=True).argsort(-1)[:, digits]
        out["heads"][name] = ranks.amax(-1).tolist()
        out.setdefault("selected_per_1024", {})[name] = distance_histogram(grouped, budget)
    mean = 0
    for layer in range(len(captured.qk)):
        weights = _llm_weights(*captured.qk[layer], 0, last)                                    # [Hq, last+1]
        out["llm_share"].append(round(float(weights[:, digits].sum(-1).mean()), 4))
        mean = mean + weights.mean(0) / len(captured.qk)
    # The distiller's target ranks them too: the layer-mean attention, sink excluded (always kept).
    mean[0] = float("-inf")
    out["llm_mean_worst_rank"] = int(mean.argsort(descending=True).argsort()[digits].max())
    return out


def main(argv: list[str]) -> None:
    from specontext_compiler.smollm2 import load_causal_lm
    model, tokenizer, _ = load_causal_lm("smollm2")
    length = int(argv[0]) if argv else 8192
    depth = float(argv[1]) if len(argv) > 1 else 0.5
    heads = argv[2:] or ["self:0", "self-prefix:2", "self-prefix:4"]
    print(needle_ranks(model, tokenizer, heads, length=length, depth=depth))


if __name__ == "__main__":
    main(sys.argv[1:])

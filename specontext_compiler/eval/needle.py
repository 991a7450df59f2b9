"""Why a head misses the passkey: where the key's digits rank in its scores, and which LLM layers read them.

One passkey prompt (context + question) is prefilled densely, followed by the correct answer (a
space and the key, teacher-forced). For the question's last token, each head scores the context as
head-level selection does (max over a KV group's query heads); we report the worst rank of the
key's digit tokens per KV group (the selection keeps ranks below its budget). The same at every
answer token that predicts a digit (`heads_at_answer`): those are the sparse decode steps when
the question is in the prompt. Beside it, the LLM's own softmax weight on those digits per layer,
averaged over query heads, their worst rank under the layer-mean attention (what `specontext
distill` fits a head to), and at each answer step, per KV group, the weight of the group's most
attentive head summed over layers (`llm_group_share_at_answer`: which groups read the key).

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
    """{"heads": name -> worst digit rank per KV group at the question's last token,
    "heads_at_answer": name -> the same at each answer step, "selected_per_1024": name -> per
    group the top-`budget` positions per 1024-token bin, "llm_share": per-layer weight on the
    digits, "llm_mean_worst_rank": the digits' worst rank under the layer-mean attention,
    "llm_group_share_at_answer": per answer step and KV group, the weight of the group's most
    attentive head on the digits, summed over layers}."""
    key = passkey(seed)
    context, question = passkey_prompt(tokenizer, length - 8, depth, key)
    answer = tokenizer(" " + key, add_special_tokens=False).input_ids
    ids = torch.tensor([context + question + answer])
    last, digits = len(context) + len(question) - 1, key_positions(tokenizer, context, key)
    # The question's last token, then each answer token that predicts the next one.
    queries = list(range(last, ids.shape[1] - 1))
    captured = capture_qk(model, ids, queries)
    out = {"length": length, "depth": depth, "digits": len(digits), "heads": {}, "heads_at_answer": {},
           "llm_share": []}
    for name in heads:
        head = make_head(model, name)
        q, k = context_qk(head, ids, captured.hidden)
        per_step = [_worst_digit_ranks(head, q[:, :, t], k[:, :, :t], digits) for t in queries]
        out["heads"][name] = per_step[0][0]
        out["heads_at_answer"][name] = [ranks for ranks, _ in per_step[1:]]
        out.setdefault("selected_per_1024", {})[name] = distance_histogram(per_step[0][1], budget)
    mean = 0
    groups = model.config.num_key_value_heads
    reading = torch.zeros(len(queries) - 1, groups)
    for layer in range(len(captured.qk)):
        weights = _llm_weights(*captured.qk[layer], 0, last)                                    # [Hq, last+1]
        out["llm_share"].append(round(float(weights[:, digits].sum(-1).mean()), 4))
        mean = mean + weights.mean(0) / len(captured.qk)
        for step in range(1, len(queries)):
            share = _llm_weights(*captured.qk[layer], step, queries[step])[:, digits].sum(-1)   # [Hq]
            reading[step - 1] += share.view(groups, -1).amax(-1)
    out["llm_group_share_at_answer"] = [[round(float(x), 2) for x in row] for row in reading]
    # The distiller's target ranks them too: the layer-mean attention, sink excluded (always kept).
    mean[0] = float("-inf")
    out["llm_mean_worst_rank"] = int(mean.argsort(descending=True).argsort()[digits].max())
    return out


def _worst_digit_ranks(head, q: torch.Tensor, k: torch.Tensor, digits: list[int]) -> tuple[list[int], torch.Tensor]:
    """(worst rank of the digits per KV group, the group scores [G, S]) for one query q [1, Hq, D]
    over the keys k [1, Hkv, S] before it, as head-level selection ranks them."""
    scores = selection.attention_weights(q, k, head.scaling)[0]                       # [Hq, S]
    grouped = selection.group_scores(scores[None], head.selection_kv_heads)[0]       # [G, S]
    ranks = grouped.argsort(-1, descending=True).argsort(-1)[:, digits]
    return ranks.amax(-1).tolist(), grouped


def main(argv: list[str]) -> None:
    from specontext_compiler.smollm2 import load_causal_lm
    model, tokenizer, _ = load_causal_lm("smollm2")
    length = int(argv[0]) if argv else 8192
    depth = float(argv[1]) if len(argv) > 1 else 0.5
    heads = argv[2:] or ["self:0", "self-prefix:2", "self-prefix:4"]
    print(needle_ranks(model, tokenizer, heads, length=length, depth=depth))


if __name__ == "__main__":
    main(sys.argv[1:])

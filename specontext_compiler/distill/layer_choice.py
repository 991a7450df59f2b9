"""Which LLM layers the teacher should follow: the ones that look up far context by content.

A retrieval head earns its keep on far look-ups (a passkey, a name defined pages ago): tokens the
recent window cannot hold and that only some layers read. Those layers show it on any text with
repeats: at a query whose token occurred before, they attend to the token that FOLLOWED that
earlier occurrence (the copy or induction pattern; "the pass key is" -> the digits after the
key's first mention). The score of a layer is the attention mass its heads put, on average, on
such successors that lie farther back than `far_distance` (an eighth of the sequence), at query
positions that have one. Layers whose score reaches AUTO_FRACTION of the best layer's become the
teacher layers.

Plain far attention mass does not work as a score: on SmolLM2 layers 3-10 put half their mass on
a few fixed early tokens (secondary sinks, the same keys for every query) and would win, while the
layers that read a passkey (20-23) put most of theirs on token 0 and look far only when the text
asks (benchmarks/ACCURACY.md).

Only layers that select tokens are candidates (`selecting_layers`): a model with sliding-window
layers (Gemma-3) keeps those dense over their window, so the head serves its global layers alone,
and a local layer's attention over the whole sequence (what the capture hook sees) is not what
the model computes.
"""
from __future__ import annotations

import torch

from specontext_compiler.distill import teacher as teacher_signal
from specontext_compiler.errors import SpecontextError

AUTO_FRACTION = 0.25        # keep layers with at least this share of the best layer's copy score
PROBE_SEQUENCES = 4         # training sequences the probe reads (of the distillation's own text)
PROBE_QUERIES = 256         # query positions per sequence, among those with a far repeat


def selecting_layers(config) -> tuple[int, ...]:
    """The layers whose attention selects tokens: every layer, or a windowed model's global ones."""
    from specontext_compiler.models import layer_windows
    return tuple(i for i, window in enumerate(layer_windows(config)) if window == 0)


def far_distance(seq_len: int, recent: int) -> int:
    """Distance beyond which a key counts as far: an eighth of the sequence, at least the recent window."""
    return max(recent + 1, seq_len // 8)


def copy_targets(ids: torch.Tensor, far: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [P], targets [P, T] bool): key j is a target of query p when ids[j-1] ==
    ids[p] and j < p - far (the successor of an earlier occurrence, far back). Only queries with a
    target are kept, the last `limit` of them (the most context before them)."""
    ids = ids.cpu()
    keys = torch.arange(len(ids))
    previous = torch.cat([ids.new_full((1,), -1), ids[:-1]])
    queries = torch.arange(far + 2, len(ids))
    targets = (previous[None, :] == ids[queries][:, None]) & (keys[None, :] < queries[:, None] - far)
    has = targets.any(-1)
    return queries[has][-limit:], targets[has][-limit:]


class CopyScore:
    """Capture hook: per candidate layer, the mean over heads and queries of the attention mass on
    targets (other layers are skipped)."""

    def __init__(self, positions: torch.Tensor, targets: torch.Tensor, num_layers: int,
                 candidates: tuple[int, ...]):
        self.positions, self.targets, self.candidates = positions, targets, frozenset(candidates)
        self.causal = torch.arange(targets.shape[1], device=positions.device)[None, :] <= positions[:, None]
        self.total = torch.zeros(num_layers, dtype=torch.float64)
        self.calls = torch.zeros(num_layers)

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if layer not in self.candidates:
            return
        mass = 0.0
        for heads, weights in teacher_signal.attention_by_group(query, key, self.positions, self.causal):
            mass += float((weights * self.targets).sum(-1).mean(-1).sum())
        self.total[layer] += mass / query.shape[1]
        self.calls[layer] += 1

    def scores(self) -> list[float]:
        return (self.total / self.calls.clamp(min=1)).tolist()


@torch.no_grad()
def copy_scores(model, sequences: list[torch.Tensor], recent: int,
                queries: int = PROBE_QUERIES, progress=None) -> tuple[list[float | None], int]:
    """(per-layer copy score, None for a layer that never selects; query positions probed) over
    `sequences` (token ids [T] each)."""
    device = teacher_signal.model_device(model)
    layers, candidates = model.config.num_hidden_layers, selecting_layers(model.config)
    totals, probed, used = torch.zeros(layers, dtype=torch.float64), 0, 0
    for index, ids in enumerate(sequences):
        positions, targets = copy_targets(ids, far_distance(len(ids), recent), queries)
        if len(positions):
            hook = CopyScore(positions.to(device), targets.to(device), layers, candidates)
            with teacher_signal.attention_capture(model, hook), teacher_signal.autocast(device):
                model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
            totals += torch.tensor(hook.scores(), dtype=torch.float64)
            probed, used = probed + len(positions), used + 1
        if progress is not None:
            progress(index + 1, len(sequences))
    means = (totals / max(used, 1)).tolist()
    return [score if layer in candidates else None for layer, score in enumerate(means)], probed


def choose_layers(scores: list[float | None], fraction: float = AUTO_FRACTION) -> tuple[int, ...]:
    """Scored layers whose score is at least `fraction` of the best; all scored layers when none
    looks far. A None score marks a layer that never selects (it is never chosen)."""
    scored = {i: score for i, score in enumerate(scores) if score is not None}
    best = max(scored.values())
    if best <= 0:
        return tuple(scored)
    return tuple(i for i, score in scored.items() if score >= fraction * best)


def auto_teacher_layers(model, sequences: list[torch.Tensor], recent: int, progress=None) -> dict:
    """The automatic choice and its reason: {"layers", "scores", "rule", "probed_queries"}."""
    if not sequences:
        raise SpecontextError("choosing teacher layers needs at least one training sequence")
    scores, probed = copy_scores(model, sequences, recent, progress=progress)
    layers = choose_layers(scores)
    if probed == 0:
        rule = "no token of the probe text repeats far back; all layers"
    else:
        rule = (f"copy score >= {AUTO_FRACTION:g} x best: attention mass on the successor of an earlier "
                f"occurrence of the query's token, beyond {far_distance(len(sequences[0]), recent)} tokens")
    if None in scores:
        rule += "; global layers only (sliding-window layers keep their window and never select)"
    return {"layers": list(layers), "scores": [None if s is None else round(s, 6) for s in scores],
            "rule": rule, "probed_queries": probed, "probe_sequences": len(sequences)}

"""Fit a fused retrieval head to the teacher (paper Eq. 2: KL from the LLM's attention).

The student is a `RetrievalHead` itself, its tensors made trainable, so training and the runtime
share one forward (`projection_input` + `qk_from_input`). It starts from a plain head (the LLM's
embedding norm and layer 0's Q/K): the embedding half of the fused Q/K keeps those weights, the
feature half and `fc` start small and random, so step 0 already scores like layer 0. The loss per
query head is the cross-entropy of the teacher distribution against the head's log-softmax over the
selectable keys (KL up to the teacher's entropy); with level "group", the same for each selection
group's mixture of heads against the group's mean target. Validation recall: the teacher mass
inside the top-k keys of each selection group's max score, as `selection.select_tokens` picks them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from specontext_compiler.distill.teacher import TeacherSample, autocast, selectable_keys
from specontext_compiler.runtime import selection
from specontext_compiler.runtime.retrieval_head import RetrievalHead

RECALL_AT = (128, 512)
FEATURE_INIT_SCALE = 0.1      # the feature half of Q/K starts at a tenth of nn.Linear's init


def _linear_init(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)), from an explicit generator."""
    bound = 1 / math.sqrt(columns)
    return (torch.rand(rows, columns, generator=generator) * 2 - 1) * bound


def fused_student(base: RetrievalHead, feature_layers: tuple[int, ...], seed: int) -> RetrievalHead:
    """A fused head whose embedding half is `base` (a plain head) and whose feature half is fresh.

    Everything else of `base` carries over, Gemma's per-head q/k norms and (1 + w) norm offset
    included: without them the student would not start as its base's layer 0 (Gemma's norm
    weights sit near 0, so a plain w-scaled norm all but zeroes the projections' input)."""
    hidden, generator = base.hidden_size, torch.Generator().manual_seed(seed)
    width = len(feature_layers) * hidden

    def widen(weight: torch.Tensor) -> torch.Tensor:
        fresh = _linear_init(weight.shape[0], 2 * hidden, generator)[:, hidden:] * FEATURE_INIT_SCALE
        return torch.cat([weight.detach().float().cpu(), fresh], dim=1)

    def copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().float().cpu().clone()

    return RetrievalHead(
        embedding=base.embedding, norm_weight=copy(base.norm_weight),
        q_weight=widen(base.q_weight), k_weight=widen(base.k_weight),
        q_bias=copy(base.q_bias), k_bias=copy(base.k_bias),
        q_norm_weight=copy(base.q_norm_weight), k_norm_weight=copy(base.k_norm_weight), norm_offset=base.norm_offset,
        num_heads=base.num_heads, num_kv_heads=base.num_kv_heads, head_dim=base.head_dim,
        norm_eps=base.norm_eps, rope=base.rope, max_position_embeddings=base.max_position_embeddings,
        embedding_shared=base.embedding_shared, embedding_name=base.embedding_name,
        selection_kv_heads=base.selection_kv_heads, vocab_size=base.vocab_size, source=base.source,
        layer=base.layer, feature_layers=feature_layers, fc_weight=_linear_init(hidden, width, generator),
        feature_norm_weight=torch.ones(width))


TRAINED = ("norm_weight", "q_weight", "k_weight", "q_bias", "k_bias", "fc_weight", "feature_norm_weight",
           "q_norm_weight", "k_norm_weight")


def trainable(head: RetrievalHead) -> list[torch.Tensor]:
    """Mark the head's own tensors as requiring grad (never the shared embedding); returns them."""
    tensors = []
    for name in TRAINED:
        tensor = getattr(head, name)
        if tensor is not None:
            tensor.requires_grad_(True)
            tensors.append(tensor)
    return tensors


def attention_logits(head: RetrievalHead, sample: TeacherSample) -> torch.Tensor:
    """The head's logits [Hq, P, T] at the sample's query positions over all its keys."""
    seq_len, device = len(sample.ids), head.q_weight.device
    previous = RetrievalHead.shift_features(sample.features[None].to(device).float())
    embedded = head.embedding.detach()[sample.ids.to(head.embedding.device)][None].to(device).float()
    x = head.projection_input(embedded, previous)
    q, k = head.qk_from_input(x, torch.arange(seq_len, device=device)[None])
    k = k[0].repeat_interleave(head.num_heads // head.num_kv_heads, dim=0)
    with torch.autocast(device.type, enabled=False):       # the ranking needs fp32 logits
        return torch.einsum("hpd,htd->hpt", q[0][:, sample.positions.to(device)].float(), k.float()) * head.scaling


LOSS_LEVELS = ("head", "group")


def cross_entropy(teacher: torch.Tensor, log_probs: torch.Tensor, groups: int, level: str) -> torch.Tensor:
    """Cross-entropy of teacher [Hq, P, T] against the head's log_probs [Hq, P, T].

    "head": each query head matches the LLM's head of the same index. "group": each selection
    group's mixture of its heads matches the group's mean target, so the heads of a group may
    divide the group's work between them (one looking up copies, one reading nearby text), which
    a per-head target forbids; head-level selection only sees the group's max anyway."""
    if level == "head":
        return -(teacher * log_probs).sum(-1).mean()
    heads, queries, keys = log_probs.shape
    per_group = heads // groups
    mixture = log_probs.view(groups, per_group, queries, keys).logsumexp(1) - math.log(per_group)
    target = teacher.view(groups, per_group, queries, keys).mean(1)
    return -(target * mixture).sum(-1).mean()


def loss_and_recall(head: RetrievalHead, sample: TeacherSample, recent: int,
                    recall_at: tuple[int, ...] = RECALL_AT,
                    level: str = "head") -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the teacher against the head over the selectable keys (per head or per
    selection group, `cross_entropy`); recall at each k."""
    seq_len, device = len(sample.ids), head.q_weight.device
    allowed = selectable_keys(sample.positions, seq_len, recent).to(device)
    teacher = sample.teacher.to(device).float()
    log_probs = attention_logits(head, sample).masked_fill(~allowed, -1e9).log_softmax(-1)
    loss = cross_entropy(teacher, log_probs, head.selection_kv_heads, level)
    with torch.no_grad():
        recall = group_recall(log_probs.exp(), teacher, head.selection_kv_heads, recall_at)
    return loss, recall


def group_recall(scores: torch.Tensor, teacher: torch.Tensor, groups: int,
                 recall_at: tuple[int, ...]) -> dict[str, float]:
    """Mean teacher mass [Hq, P, T] inside each group's top-k of its max score over its heads."""
    heads, queries, keys = scores.shape
    grouped = selection.group_scores(scores.transpose(0, 1), groups).transpose(0, 1)     # [G, P, T]
    teacher = teacher.view(groups, heads // groups, queries, keys)
    recall = {}
    for k in recall_at:
        top = grouped.topk(min(k, keys), dim=-1).indices
        chosen = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, top, True)
        recall[f"recall@{k}"] = float((teacher * chosen[:, None]).sum(-1).mean())
    return recall


def evaluate(head: RetrievalHead, samples: list[TeacherSample], recent: int,
             recall_at: tuple[int, ...] = RECALL_AT, level: str = "head") -> dict[str, float]:
    """Mean loss and recall over samples."""
    totals: dict[str, float] = {}
    with torch.no_grad(), autocast(head.q_weight.device):
        for sample in samples:
            loss, recall = loss_and_recall(head, sample, recent, recall_at, level)
            for name, value in {"loss": float(loss), **recall}.items():
                totals[name] = totals.get(name, 0.0) + value / len(samples)
    return totals


def fit(base: RetrievalHead, train: list[TeacherSample], validation: list[TeacherSample], *,
        feature_layers: tuple[int, ...], epochs: int, lr: float, seed: int, recent: int,
        recall_at: tuple[int, ...] = RECALL_AT, level: str = "head", device: str | torch.device = "cpu",
        progress: Callable[[int, int, str], None] | None = None) -> tuple[RetrievalHead, list[dict]]:
    """(trained fused head on `device`, per-epoch validation history; entry 0 is before training).

    AdamW without weight decay, one sequence per step, a one-cycle learning-rate schedule; fp32
    weights, bf16 autocast on CUDA. Samples may live on the CPU: each step moves one sequence.
    progress(steps done, steps in all, note) after every step; note is the epoch's validation line."""
    device = torch.device(device)
    head = fused_student(base, feature_layers, seed).to(device)
    history = [{"epoch": 0, **evaluate(head, validation, recent, recall_at, level)}]
    steps, done = epochs * len(train), 0
    _log(progress, history[-1], done, steps)
    parameters = trainable(head)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for index in torch.randperm(len(train), generator=order).tolist():
            with autocast(device):
                loss, _ = loss_and_recall(head, train[index], recent, recall_at, level)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if progress is not None and done % len(train):
                progress(done, steps, "")
        history.append({"epoch": epoch, **evaluate(head, validation, recent, recall_at, level)})
        _log(progress, history[-1], done, steps)
    for tensor in parameters:
        tensor.requires_grad_(False)
    return head, history


def _log(progress: Callable[[int, int, str], None] | None, entry: dict, done: int, steps: int) -> None:
    if progress is not None:
        figures = ", ".join(f"{name} {value:.4f}" for name, value in entry.items() if name != "epoch")
        progress(done, steps, f"epoch {entry['epoch']}: validation {figures}")

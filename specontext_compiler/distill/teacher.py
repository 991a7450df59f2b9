"""The teacher signal: which keys the LLM attends to, at sampled query positions (paper Eq. 2).

One dense forward per sequence with a capture hook on every layer's post-RoPE q and k gives, at P
query positions, each layer's softmax attention per query head. Selection never picks the sink
token 0 or the recent window (both are always attended), so each row is renormalized over the
selectable keys only; the teacher aggregates the layers, renormalized again: "mean" (default) is
what attention recall averages, so its top-k maximises recall; "max" says a key matters if any
layer needs it, since one selection serves them all (lower recall on SmolLM2 at budgets
256-1024). `layers` restricts the aggregate to some of the LLM's layers (e.g. the ones that read
far context, where a passkey is looked up; `layer_choice` finds them). The same forward yields the
hidden states that a fused head reads (`feature_layers`, HF output_hidden_states indices), tapped
at those layers only. The forward runs on the model's device (bf16 autocast on CUDA); each layer's
attention is reduced into the aggregate as the layer runs, so memory does not grow with depth.
Stored in fp16 (features in bf16 when fp16 cannot hold them), on the CPU by default.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
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
    """Capture hook: the running sum or max over layers of renormalized attention at the queries.

    Each layer's attention is reduced into `total` [Hq, P, T] as soon as the layer runs, one KV
    group at a time, so no layer's map outlives its own call: peak memory is one group's
    [Hq/Hkv, P, T] on top of the aggregate, whatever the depth (an 8B model at 8k tokens fits)."""

    def __init__(self, positions: torch.Tensor, seq_len: int, recent: int, num_heads: int, aggregate: str,
                 layers: frozenset[int] | None = None):
        self.aggregate, self.layers = aggregate, layers
        self.positions = positions
        self.allowed = selectable_keys(positions.cpu(), seq_len, recent).to(positions.device)
        self.causal = torch.arange(seq_len, device=positions.device)[None, :] <= positions[:, None]
        self.total = torch.zeros(num_heads, len(positions), seq_len, device=positions.device)

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        for heads, weights in attention_by_group(query, key, self.positions, self.causal):
            weights = _renormalize(weights * self.allowed)
            if self.aggregate == "max":
                torch.maximum(self.total[heads], weights, out=self.total[heads])
            else:                  # a sum renormalizes to the mean
                self.total[heads] += weights

    def teacher(self) -> torch.Tensor:
        return _renormalize(self.total * self.allowed)


def attention_by_group(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, causal: torch.Tensor):
    """Yield (query-head slice, softmax weights [Hq/Hkv, P, T] in fp32) per KV group.

    query [1, Hq, T, D], key [1, Hkv, T, D] post-RoPE (any dtype); causal [P, T] bool. The logits
    are fp32 even under autocast: ranking thousands of keys needs more than bf16's 8 bits."""
    group = query.shape[1] // key.shape[1]
    with torch.autocast(query.device.type, enabled=False):
        for kv in range(key.shape[1]):
            heads = slice(kv * group, (kv + 1) * group)
            q = query[0, heads][:, positions].float()                          # [g, P, D]
            logits = torch.einsum("hpd,td->hpt", q, key[0, kv].float()) * q.shape[-1] ** -0.5
            yield heads, logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _renormalize(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the teacher forward and the student's projections); a no-op on CPU,
    where bf16 matmuls are slower than fp32 and the reference numbers were made in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextmanager
def feature_taps(model, feature_layers: tuple[int, ...]):
    """Record the hidden states that output_hidden_states would give at `feature_layers` (index i <
    L: the input of decoder layer i; index L: the final norm's output), and only those: keeping
    all L+1 of them costs gigabytes for an 8B model at 8k tokens. Yields {index: [1, T, H]}."""
    decoder = model.get_decoder()
    taken: dict[int, torch.Tensor] = {}
    handles = []
    for index in feature_layers:
        if index == len(decoder.layers):
            handles.append(decoder.norm.register_forward_hook(
                lambda module, args, output, index=index: taken.__setitem__(index, output)))
        else:
            handles.append(decoder.layers[index].register_forward_pre_hook(
                lambda module, args, kwargs, index=index: taken.__setitem__(
                    index, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()


def feature_storage_dtype(features: torch.Tensor) -> torch.dtype:
    """fp16 (finer than bf16) for hidden states within its range, else bf16: a bf16 model's may
    outgrow fp16, and so do an fp32 model's at times (Gemma-3-270M's reach ~76,000, fp16 ends at
    65,504, and an inf feature turns the head's RMS norm into NaN)."""
    if features.dtype == torch.bfloat16 or float(features.abs().max()) > torch.finfo(torch.float16).max:
        return torch.bfloat16
    return torch.float16


@torch.no_grad()
def collect(model, ids: torch.Tensor, positions: torch.Tensor, feature_layers: tuple[int, ...],
            recent: int, aggregate: str = "mean", layers: tuple[int, ...] | None = None,
            store: str | torch.device = "cpu") -> TeacherSample:
    """Run `model` densely over ids [T] once, on its own device (bf16 autocast on CUDA): the
    teacher at `positions` (over `layers`, default all) and the features, stored on `store`."""
    seq_len, device = len(ids), model_device(model)
    if int(positions.min()) <= recent:
        raise SpecontextError(f"query position {int(positions.min())} has no selectable key "
                              f"(recent window {recent})")
    if aggregate not in AGGREGATES:
        raise SpecontextError(f"teacher aggregate {aggregate!r}: choose one of {AGGREGATES}")
    hook = _LayerAggregate(positions.to(device), seq_len, recent, model.config.num_attention_heads, aggregate,
                           frozenset(layers) if layers is not None else None)
    with attention_capture(model, hook), feature_taps(model, feature_layers) as taken, autocast(device):
        model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
    features = torch.cat([taken[i][0] for i in feature_layers], dim=-1)
    features = features.to(feature_storage_dtype(features))
    return TeacherSample(ids=ids.clone().cpu(), positions=positions.cpu(), teacher=hook.teacher().half().to(store),
                         features=features.to(store))


@contextmanager
def attention_capture(model, hook):
    """Route the model's attention through the eval's function with `hook` seeing every layer's
    post-RoPE q, k; restore the model's own attention implementation afterwards."""
    previous = getattr(model.config, "_attn_implementation", None)
    sparse_attention.install(model)
    try:
        with sparse_attention.active(capture=hook):
            yield
    finally:
        if previous and previous != sparse_attention.ATTN_NAME:
            model.set_attn_implementation(previous)

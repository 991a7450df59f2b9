"""Synthetic selection overlap: make random benchmark state select with a chosen step-to-step overlap.

    python benchmarks/overlap_control.py --context 130560 --budget 2048 --targets 0.7,0.8,0.9 --held-out-seed 1

Why: a decode step's time depends on the values only through the selection, i.e. through how many
rows elastic loading copies. Random weights and random caches give consecutive steps nearly
unrelated selections (overlap 0.10-0.16, benchmarks/RESULTS.md); real weights give ~0.8. This
module changes only the benchmark's inputs (one fixed token every step) and the retrieval head's
K cache (structured noise), so the plan's captured step runs unchanged and selects with a target
overlap.

Construction. The head caches post-RoPE keys k_j = R_j u_j and scores q_t . k_j with q_t = R_t q,
so a score is q . R_(j-t) u_j. With a fixed token q is fixed and a step only moves t by one,
turning rotary pair i by its frequency w_i (radians a step). Pairs with w_i < STABLE_MAX_RAD keep
their part of every score from one step to the next; pairs with w_i >= SCRAMBLED_MIN_RAD rotate
it by 29-57 degrees each step. u_j is Gaussian in those two bands only (the pairs between would
change scores over tens of steps, so the overlap would depend on how long a run is), mixed by
`beta`: the scrambled part's score std over the stable part's (for an isotropic query), with
|u_j|^2 ~ D whatever beta is. beta = 0 keeps nearly the same rows every step; a larger beta fewer.

Calibration bisects beta against a simulation of the runtime's own selection (selection.py:
attention_weights, select_tokens, the plan's budget, sinks and recent window) and its own copy
count (the prefetcher's elastic_diff): overlap = 1 - rows to copy / rows selected, over
consecutive steps, as Engine.stats()["selection_overlap"] counts it. The step that first fills a
layer's buffer copies everything; the engine's figure includes it, `overlap_between` leaves it out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from specontext_compiler.dlm import rope_of
from specontext_compiler.runtime import selection
from specontext_compiler.runtime.kernels.elastic_load import elastic_diff
from specontext_compiler.runtime.retrieval_head import apply_rope, rope_inv_freq
from specontext_compiler.runtime.step_context import SelectionConfig

# Radians a rotary pair turns per step. Under 0.005 a pair turns under 3 degrees in 10 steps;
# from 0.5 on (Llama-3's four fastest pairs: 0.54-1.0 rad) it decorrelates a score noticeably.
# Neither bound is within 0.05 of a pair's index on theta^(-2i/D) for theta 1e4, 5e5, 1e6 at
# D = 16..128, so float rounding cannot move a pair across it.
STABLE_MAX_RAD = 0.005
SCRAMBLED_MIN_RAD = 0.5
SIMULATED_STEPS = 5           # selections simulated per overlap estimate (4 step-to-step overlaps)
DEFAULT_TOKEN = 7             # any id: only its query matters, and it stays the same


@dataclass(frozen=True)
class Rope:
    """The retrieval head's rotary embedding: inverse frequencies [D/2] fp32 and cos/sin scale."""

    inv_freq: torch.Tensor
    scale: float

    @classmethod
    def of(cls, rope: dict, head_dim: int, max_position_embeddings: int) -> "Rope":
        """The schedule the runtime applies (retrieval_head.rope_inv_freq, llama3/yarn included)."""
        return cls(*rope_inv_freq(rope, head_dim, max_position_embeddings))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [H, T, D] rotated to positions [T]."""
        return apply_rope(x[None], positions[None], self.inv_freq, self.scale)[0]


@dataclass(frozen=True)
class Calibration:
    """The knob found for a target overlap and the overlap the simulation gives with it."""

    target: float
    beta: float
    simulated_overlap: float


def band_masks(rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """(stable, scrambled) float masks [D] over head dims (half-split layout: pair i is dims i, i+D/2)."""
    stable = (rope.inv_freq < STABLE_MAX_RAD).float()
    scrambled = (rope.inv_freq >= SCRAMBLED_MIN_RAD).float()
    if not stable.any() or not scrambled.any():
        raise ValueError(f"the head's RoPE has no pair turning under {STABLE_MAX_RAD} rad a step or none "
                         f"from {SCRAMBLED_MIN_RAD} rad on; synthetic overlap needs both")
    return torch.cat([stable, stable]), torch.cat([scrambled, scrambled])


class KeyDraws:
    """One draw of the two key parts, post-RoPE, [Hkv, S, D] fp32 each; keys(beta, h) mixes head h's.

    RoPE is linear, so rotating each part once and mixing after is the same as rotating the mix:
    bisection reuses one draw, so the simulated overlap changes with beta alone, not with the draw.
    """

    def __init__(self, num_kv_heads: int, count: int, rope: Rope, generator: torch.Generator, device):
        stable_mask, scrambled_mask = (m.to(device) for m in band_masks(rope))
        dim = stable_mask.numel()
        positions = torch.arange(count, device=device)

        def part(mask):   # Gaussian in the band, |u|^2 ~ D; one head at a time bounds the temporaries
            out = torch.empty(num_kv_heads, count, dim, device=device)
            for head in range(num_kv_heads):
                noise = torch.randn(1, count, dim, generator=generator, device=device)
                out[head] = rope.rotate(noise * mask * math.sqrt(dim / mask.sum()), positions)[0]
            return out

        self.stable, self.scrambled = part(stable_mask), part(scrambled_mask)

    def keys(self, beta: float, kv_head: int) -> torch.Tensor:
        """[S, D] fp32: cos(a) stable + sin(a) scrambled with tan(a) = beta, for one KV head."""
        angle = math.atan(beta)
        return math.cos(angle) * self.stable[kv_head] + math.sin(angle) * self.scrambled[kv_head]


def simulated_overlap(queries: torch.Tensor, keys_of_head: Callable[[int], torch.Tensor], num_kv_heads: int,
                      context: int, config: SelectionConfig, scaling: float) -> float:
    """Overlap of consecutive selections, counted the runtime's way, for queries [n, Hq, D] (one a step).

    keys_of_head(h) -> [L, D]: KV head h's cached keys, built on demand so that every head's keys
    never exist at once. Step t scores positions [0, context + t), as the runtime does after t
    decode steps (L >= context + n - 1: the tail holds the keys those steps cached). Head level:
    one index set per KV head, so each KV head's group selects alone.
    """
    if config.level != "head":
        raise ValueError(f"synthetic overlap simulates head-level selection, the plan's is {config.level!r}")
    steps, num_heads, _ = queries.shape
    copied = selected = 0
    for kv_head, group_queries in enumerate(queries.split(num_heads // num_kv_heads, dim=1)):
        head_keys = keys_of_head(kv_head)[None, None]
        previous = None
        for step in range(steps):
            lens = torch.tensor([context + step], device=head_keys.device)
            weights = selection.attention_weights(group_queries[step][None], head_keys, scaling, seq_lens=lens)
            chosen = selection.select_tokens(weights, 1, config.budget, sink_tokens=config.sink_tokens,
                                             recent_tokens=config.recent_tokens, seq_lens=lens)
            if previous is not None:    # the prefetcher's count: selected positions the last step did not hold
                copied += int((elastic_diff(previous, chosen)[0] >= 0).sum())
                selected += int((chosen >= 0).sum())
            previous = chosen
    return 1 - copied / selected


def overlap_at(beta: float, queries: torch.Tensor, draws: KeyDraws, tail_keys: torch.Tensor, context: int,
               config: SelectionConfig, scaling: float, dtype=torch.float32) -> float:
    """Simulated overlap with the keys mixed at beta, rounded to `dtype` as the engine holds them.

    queries [n, Hq, D] and tail_keys [Hkv, n, D]: the fixed token's post-RoPE q and k at the
    decode steps' positions context, context+1, ...
    """
    def keys_of_head(kv_head):
        return torch.cat([draws.keys(beta, kv_head), tail_keys[kv_head].float()]).to(dtype)
    return simulated_overlap(queries.to(dtype), keys_of_head, tail_keys.shape[0], context, config, scaling)


def calibrate(target: float, queries: torch.Tensor, draws: KeyDraws, tail_keys: torch.Tensor, context: int,
              config: SelectionConfig, scaling: float, dtype=torch.float32, tolerance: float = 0.005,
              iterations: int = 24) -> Calibration:
    """Bisect beta until the simulated overlap (overlap_at) is within `tolerance` of target.

    The overlap falls as beta grows; a target outside [overlap at beta ~ 1e6, overlap at 0] is refused.
    """
    def at(beta: float) -> float:
        return overlap_at(beta, queries, draws, tail_keys, context, config, scaling, dtype)

    # Bisect the mixing angle a = atan(beta) over [0, pi/2): bounded, and beta spans 0 .. ~1e6.
    low, high = 0.0, math.pi / 2 - 1e-6
    most, least = at(0.0), at(math.tan(high))
    if not least - tolerance <= target <= most + tolerance:
        raise ValueError(f"target overlap {target} is outside what this construction reaches at this shape "
                         f"({least:.3f} .. {most:.3f}); pick a target in that range")
    for _ in range(iterations):
        middle = (low + high) / 2
        overlap = at(math.tan(middle))
        if abs(overlap - target) <= tolerance:
            break
        low, high = (middle, high) if overlap > target else (low, middle)
    return Calibration(target, math.tan(middle), overlap)


# -- applying it to an engine ----------------------------------------------------------------------
def fixed_token_ids(slots: int, device, token: int = DEFAULT_TOKEN) -> torch.Tensor:
    """[slots, 1] input ids, the same token each step: the head's query then changes only by RoPE."""
    return torch.full((slots, 1), token, dtype=torch.long, device=device)


def prepare_engine(engine, context: int, target: float, token: int = DEFAULT_TOKEN, seed: int = 0) -> Calibration:
    """Calibrate beta on the engine's own head, then fill its head K cache [0, context) in every slot.

    Call after the store is filled to `context` (bench_e2e.fill_store_randomly) and feed
    fixed_token_ids(...) every step from then on.
    """
    ctx = engine.ctx
    head, store = ctx.head, ctx.store
    if head is None or head.fused:
        raise ValueError("synthetic overlap needs a plain retrieval head: a fused head's query follows the "
                         "LLM's hidden states, which a fixed token does not hold still")
    if ctx.config.level != "head" or store.layout.groups != head.num_kv_heads:
        raise ValueError("synthetic overlap simulates one index set per retrieval-head KV head; this plan "
                         f"selects {store.layout.groups} set(s) at {ctx.config.level} level")
    device, dtype = store.head_k.device, store.head_k.dtype
    rope = Rope.of(head.rope, head.head_dim, head.max_position_embeddings)
    queries, tail_keys = _fixed_token_queries(head, token, context, SIMULATED_STEPS, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    draws = KeyDraws(head.num_kv_heads, context, rope, generator, device)
    result = calibrate(target, queries, draws, tail_keys, context, ctx.config, head.scaling, dtype)
    del draws                                # 1 GB at 128k: gone before the fill draws its own
    for slot in range(store.layout.slots):   # fresh draws, one (slot, KV head) at a time (memory)
        for kv_head in range(head.num_kv_heads):
            one = KeyDraws(1, context, rope, generator, device)
            store.head_k[slot, kv_head, :context].copy_(one.keys(result.beta, 0))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def _fixed_token_queries(head, token: int, context: int, steps: int, device):
    """The head's q [steps, Hq, D] and k [Hkv, steps, D] for `token` at positions context, context+1, ..."""
    ids = torch.full((1, steps), token, dtype=torch.long, device=device)
    positions = torch.arange(context, context + steps, device=device)[None]
    q, k = head.project(ids, positions)
    return q[0].transpose(0, 1), k[0]


def overlap_between(before: dict, after: dict) -> float | None:
    """The engine's overlap over the steps between two Engine.stats() snapshots (same counters)."""
    requested = after["rows_requested"] - before["rows_requested"]
    loaded = after["rows_loaded"] - before["rows_loaded"]
    return 1 - loaded / requested if requested else None


def parse_target(text: str) -> float:
    """A target overlap from the command line: a number strictly between 0 and 1 (ValueError if not)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:     # also refuses nan
        raise ValueError(f"overlap target {text!r} is not a number between 0 and 1; give the share of rows "
                         "a step keeps from the step before, e.g. 0.8")
    return value


# -- a model's head shape without its weights (the figures in RESULTS.md) --------------------------
@dataclass(frozen=True)
class ShapeInputs:
    """What calibrate() needs at a model's head shape, without its weights (see unweighted_inputs)."""

    queries: torch.Tensor       # [n, Hq, D]
    tail_keys: torch.Tensor     # [Hkv, n, D]
    draws: KeyDraws
    config: SelectionConfig
    scaling: float


def unweighted_inputs(config: dict, context: int, budget: int, seed: int = 0, sink_tokens: int = 1,
                      recent_tokens: int = 16) -> ShapeInputs:
    """An HF config's head shape and RoPE, with a unit Gaussian fixed query and own key (CPU)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = Rope.of(rope_of(config), dim, config["max_position_embeddings"])
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(context, context + SIMULATED_STEPS)

    def at_decode_positions(count):   # one fixed vector per head, rotated to each step's position
        fixed = torch.randn(count, 1, dim, generator=generator).expand(count, SIMULATED_STEPS, dim)
        return rope.rotate(fixed.contiguous(), positions)

    queries, tail_keys = at_decode_positions(heads).transpose(0, 1), at_decode_positions(kv_heads)
    return ShapeInputs(queries, tail_keys, KeyDraws(kv_heads, context, rope, generator, "cpu"),
                       SelectionConfig(budget, sink_tokens, recent_tokens), dim ** -0.5)


def main() -> None:
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-8b", help="model preset: the head's shape and RoPE")
    parser.add_argument("--context", type=int, default=130560)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--targets", default="0.7,0.8,0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-seed", type=int, help="also simulate each beta on this seed's fresh "
                        "query and keys (the benchmark fills its slots with draws calibration never saw)")
    args = parser.parse_args()
    preset = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets" / f"{args.preset}.json"
    try:
        targets = [parse_target(t) for t in args.targets.split(",")]
        if not preset.is_file():
            names = sorted(p.stem for p in preset.parent.glob("*.json"))
            raise ValueError(f"no preset {args.preset!r}; use one of {', '.join(names)}")
        config = json.loads(preset.read_text())
        shape = unweighted_inputs(config, args.context, args.budget, args.seed)
        held_out = (unweighted_inputs(config, args.context, args.budget, args.held_out_seed)
                    if args.held_out_seed is not None else None)
        for target in targets:
            result = calibrate(target, shape.queries, shape.draws, shape.tail_keys, args.context, shape.config,
                               shape.scaling)
            row = {"preset": args.preset, "context": args.context, "budget": args.budget, "target": target,
                   "beta": round(result.beta, 4), "simulated_overlap": round(result.simulated_overlap, 4)}
            if held_out is not None:
                row["held_out_overlap"] = round(overlap_at(result.beta, held_out.queries, held_out.draws,
                                                           held_out.tail_keys, args.context, held_out.config,
                                                           held_out.scaling), 4)
            print(json.dumps(row), flush=True)
    except ValueError as exc:
        print(f"overlap_control.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

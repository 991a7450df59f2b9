"""End-to-end decode benchmark on one GPU: Hugging Face vs specontext, same run, same model shape.

    python benchmarks/bench_e2e.py --plans benchmarks/plans --contexts 32k,64k,128k --out $OUT
    python benchmarks/bench_e2e.py --contexts 130560 --methods sparse --overlap 0.8

Model: Llama-3.1-8B shape, bf16, random weights (a step's time does not depend on the values).
Caches are filled with random K/V of the context length instead of a prefill. Plans are compiled
beforehand (benchmarks/compile_bench_plans.sh) for this machine's target file. Prints one
markdown table last; writes every measurement as JSON lines to OUT/bench_e2e.jsonl.

Random weights make consecutive steps select nearly unrelated rows (overlap 0.10-0.16), so
elastic loading copies most of the budget every step. --overlap F makes the sparse methods select
with a synthetic step-to-step overlap F instead (overlap_control.py: a fixed token every step and
a structured retrieval-head K cache, calibrated on the plan's own head); the captured step is the
same. Those rows say "synthetic overlap F" and report the calibrated knob beside the overlap the
engine measured, over all steps ("overlap") and over the timed steps ("overlap_timed").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_baselines  # noqa: E402  (benchmark-local helper module)
import overlap_control  # noqa: E402  (benchmark-local helper module)

from specontext_compiler.cost_models.plan_prediction import predicted_step  # noqa: E402
from specontext_compiler.runtime.plan import load_plan  # noqa: E402
from specontext_compiler.sizes import parse_tokens  # noqa: E402


def random_llama(preset_json: Path, device):
    """The preset's model with random bf16 weights, built directly on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**json.loads(preset_json.read_text()))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def fill_store_randomly(engine, context: int) -> None:
    """Pretend every slot holds `context` tokens: random K/V, resident and offloaded alike."""
    ctx = engine.ctx
    # Residency and capacity first, while the slots are empty (a grow copies only filled rows).
    engine.memory.before_step(context)          # the plan's residency at this length
    ctx.cache_len.fill_(context)
    largest = max(t.numel() for layer in ctx.store.layers for t in layer.storage())
    chunk = torch.randn(min(64 << 20, largest), device=ctx.cache_len.device,    # up to 128 MiB of noise
                        dtype=ctx.store.layout.dtype)
    for layer in ctx.store.layers:
        for tensor in layer.storage():
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), chunk.numel()):
                part = flat[start:start + chunk.numel()]
                part.copy_(chunk[:part.numel()], non_blocking=True)
    if ctx.store.head_k is not None:
        ctx.store.head_k.normal_()
    if ctx.cache_len.device.type == "cuda":
        torch.cuda.synchronize()


WARM_UP_STEPS = 3     # untimed: the first one captures the CUDA graph


def time_engine(engine, context: int, steps: int, overlap: float | None = None) -> dict:
    """Median decode-step time of the engine's captured step over all slots at `context` tokens.

    overlap: a synthetic selection overlap to calibrate and apply (overlap_control.py); None keeps
    the random K cache and feeds each step's argmax token.
    """
    fill_store_randomly(engine, context)
    slots = engine.slots
    synthetic = {}
    if overlap is None:
        ids = torch.randint(0, 1000, (slots, 1), device=engine.device)
    else:
        calibration = overlap_control.prepare_engine(engine, context, overlap)
        ids = overlap_control.fixed_token_ids(slots, engine.device)
        synthetic = {"overlap_target": overlap, "overlap_beta": calibration.beta,
                     "overlap_simulated": calibration.simulated_overlap}
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + WARM_UP_STEPS):
        if step == WARM_UP_STEPS:
            before = engine.stats()
        engine.memory.before_step(int(engine.ctx.cache_len.max()))
        pos = engine.ctx.cache_len.view(-1, 1).clone()
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = engine.step.run(ids, pos)
        if overlap is None:
            ids = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        if step >= WARM_UP_STEPS:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    stats = engine.stats()
    return {"step_ms": step_s * 1e3, "tokens_per_s": slots / step_s, "batch": slots,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
            "pinned_gb": stats["host_kv_bytes"] / 1e9, "overlap": stats["selection_overlap"],
            "overlap_timed": overlap_control.overlap_between(before, stats),
            "rows_loaded_per_step": stats["rows_loaded"] / (steps + WARM_UP_STEPS),
            "captures": engine.step.captures, **synthetic}


def run_case(method: str, context: int, args) -> dict:
    """One measurement in this process (called in a fresh subprocess per case: clean GPU memory)."""
    preset = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets" / "llama-3.1-8b.json"
    model = random_llama(preset, "cuda")
    if method == "hf":
        start = hf_baselines.estimate_max_batch(model, context + args.steps + 2)
        return {"method": "HF eager (DynamicCache, largest batch)", "context": context,
                **hf_baselines.largest_fitting_batch(model, context, args.steps, start)}
    if method == "hf-offload":
        return {"method": "HF offloaded cache", "context": context,
                **hf_baselines.time_hf_decode(model, 1, context, max(3, args.steps // 3), offloading=True)}
    engine = load_plan(Path(args.plans) / f"{method}-{context}").bind(model)
    synthetic = args.overlap is not None and method.startswith("sparse")
    result = time_engine(engine, context, args.steps, args.overlap if synthetic else None)
    # The plan predicts at its compile-time overlap; also predict at the overlap this run measured
    # (with a synthetic overlap: the timed steps', which the first full load does not dilute).
    measured = result["overlap_timed"] if synthetic else result["overlap"]
    name = f"specontext {method}" + (f", synthetic overlap {args.overlap}" if synthetic else "")
    return {"method": name, "context": context,
            "predicted_step_ms": engine.plan.segment_for(context).predicted.get("step_ms"),
            "predicted_at_measured_overlap_ms": predicted_step(engine.plan, context, measured).step_ms,
            "byte_floor_ms": byte_floor_ms(engine.plan, context, measured), **result}


def byte_floor_ms(plan, context: int, overlap) -> float:
    """The step if only its bytes counted: max(HBM bytes / the target's HBM rate, bytes copied from
    host memory / its gather rate), with the bytes of the plan's latency model at this overlap."""
    step = predicted_step(plan, context, overlap)
    target = plan.target
    return max(step.hbm_bytes_per_step / (target["hbm_gbps"] * 1e6),
               step.h2d_bytes_per_step / (target["pinned_gather_gbps"] * 1e6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default="benchmarks/plans")
    parser.add_argument("--contexts", default="32768,65536,130560")
    parser.add_argument("--methods", default="hf,hf-offload,dense,sparse")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--overlap", help="synthetic selection overlap for the sparse methods, in (0, 1), "
                                          "e.g. 0.8 (default: off, random selection)")
    parser.add_argument("--case", help="internal: METHOD:CONTEXT, run one case and print its JSON")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    if args.overlap is not None:
        try:
            args.overlap = overlap_control.parse_target(args.overlap)
        except ValueError as exc:
            print(f"bench_e2e.py: --overlap: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.case:
        method, context = args.case.split(":")
        print("RESULT " + json.dumps(run_case(method, int(context), args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out / "bench_e2e.jsonl").open("a") as log:
        for context in [parse_tokens(c) for c in args.contexts.split(",")]:
            for method in args.methods.split(","):
                if not method.startswith("hf") and not (Path(args.plans) / f"{method}-{context}").exists():
                    continue
                row = _subprocess_case(method, context, args)
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
    print_table(rows)


def _subprocess_case(method: str, context: int, args) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{method}:{context}", "--plans", args.plans,
           "--steps", str(args.steps), "--out", args.out]
    if args.overlap is not None:
        cmd += ["--overlap", str(args.overlap)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"method": method, "context": context, "oom": True, "error": tail[0][:300]}


def print_table(rows) -> None:
    print("\n| context | method | batch | step ms | tok/s | peak GPU GB | pinned GB | overlap | predicted ms "
          "(plan) | predicted ms (measured overlap) | byte floor ms | step / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['context']} | {r['method']} | failed: {r.get('error', 'OOM')[:80]} | | | | | | | | | |")
            continue
        print(f"| {r['context']} | {r['method']} | {r.get('batch')} | {r.get('step_ms', 0):.1f} | "
              f"{r.get('tokens_per_s', 0):.1f} | {r.get('peak_gpu_gb', 0):.1f} | {r.get('pinned_gb', 0) or 0:.1f} | "
              f"{r.get('overlap') if r.get('overlap') is None else round(r['overlap'], 3)} | "
              f"{_ms(r.get('predicted_step_ms'))} | {_ms(r.get('predicted_at_measured_overlap_ms'))} | "
              f"{_ms(r.get('byte_floor_ms'))} | {_ratio(r.get('step_ms'), r.get('byte_floor_ms'))} |")
    print_synthetic_overlap(rows)


def print_synthetic_overlap(rows) -> None:
    """The synthetic-overlap rows' target, knob, simulated and engine-measured overlaps (none: nothing)."""
    synthetic = [r for r in rows if "overlap_target" in r]
    if not synthetic:
        return
    print("\n| context | method | target | beta | simulated | engine, all steps | engine, timed steps |")
    print("|---|---|---|---|---|---|---|")
    for r in synthetic:
        print(f"| {r['context']} | {r['method']} | {r['overlap_target']} | {r['overlap_beta']:.3f} | "
              f"{r['overlap_simulated']:.3f} | {_share(r.get('overlap'))} | {_share(r.get('overlap_timed'))} |")


def _share(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _ratio(step, floor) -> str:
    return f"{step / floor:.2f}x" if step and floor else ""


def _ms(value) -> str:
    return f"{value:.1f}" if value else ""


if __name__ == "__main__":
    main()

"""The paper's multi-request workloads (Table 5): [input, output] tokens, the plan's request count.

    python benchmarks/bench_workloads.py --workloads 16k:2k,32k:2k --plans benchmarks/plans

Llama-3.1-8B shape, random bf16 weights, random prompts; real chunked prefill through the plan's
graph, then greedy decoding of every output token through the captured decode step. "decode
tok/s" counts from the first token (continuous batching still prefills later requests then);
"steady decode tok/s" from the moment every request has its first token, which is what the plan's
decode prediction prices.

--hf adds Hugging Face's side in the same run, measured, not run to the end (32k eager steps at
~160 ms would take over an hour): its largest batch at the workload's longest context
(hf_baselines.largest_fitting_batch), one request's prefill through HF's forward (SDPA) timed and
counted once per request, and its eager decode step timed at the first, middle and last context
of the output and integrated over the output steps (trapezoid). Each row then says how many times
HF's end-to-end tokens/s ours is. Plans:
`specontext compile llama-3.1-8b --target h100 --prompt-len IN --max-len IN+OUT --budget 2048
--batch auto -o benchmarks/plans/wl-IN-OUT`. Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import random_llama  # noqa: E402
import hf_baselines  # noqa: E402  (benchmark-local helper module)

from specontext_compiler.runtime.plan import load_plan  # noqa: E402
from specontext_compiler.sizes import parse_tokens  # noqa: E402


class _TimeUp(Exception):
    """Raised from the streaming callback when the workload's time limit is reached."""


def _sync() -> None:
    """Wait for the GPU (timings are wall time); nothing to wait for on a CPU run (the test's)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_workload(model, plan_dir: Path, prompt_len: int, new_tokens: int, max_seconds: float) -> dict:
    """Serve the plan's request count; stop early (and say so) after max_seconds of wall time."""
    engine = load_plan(plan_dir).bind(model, device=next(model.parameters()).device)
    engine.warm_up()       # as a server does before it listens: kernels compiled, step captured
    vocab = engine.plan.model.vocab_size
    prompts = [torch.randint(0, min(vocab, 100000), (prompt_len,)).tolist() for _ in range(engine.slots)]
    marks = {}
    streamed = []          # request index of every token streamed so far
    first_request = []     # when each of request 0's tokens arrived: its step times, stalls included
    started = {}           # when each request's first token arrived
    arrivals = []          # when each token arrived

    def on_token(index, token):
        if not streamed:
            _sync()
            marks["first_token"] = time.perf_counter()
        streamed.append(index)
        now = time.perf_counter()
        arrivals.append(now)
        started.setdefault(index, now)
        if index == 0:
            first_request.append(now)
        if time.perf_counter() - start > max_seconds:
            raise _TimeUp

    _sync()
    start = time.perf_counter()
    try:
        engine.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False, stream=on_token)
        finished = True
    except _TimeUp:
        finished = False
    _sync()
    end = time.perf_counter()
    generated = len(streamed)
    decode_s = end - marks["first_token"]
    stats = engine.stats()
    gaps = sorted(b - a for a, b in zip(first_request, first_request[1:])) or [0.0]
    # Steady decode: from the moment every request has its first token (all prompts prefilled)
    all_started = max(started.values())
    steady_tokens = sum(1 for t in arrivals if t > all_started)
    steady_tokens_per_s = steady_tokens / (end - all_started) if end > all_started and steady_tokens else None
    return {"request0_step_ms_p50": gaps[len(gaps) // 2] * 1e3, "request0_step_ms_p90": gaps[len(gaps) * 9 // 10] * 1e3,
            "request0_step_ms_max": gaps[-1] * 1e3, "request0_stall_s": sum(g for g in gaps if g > 0.05),
            "graph_captures": engine.step.captures, "steady_decode_tokens_per_s": steady_tokens_per_s,
            "workload": f"[{prompt_len},{new_tokens}]", "requests": engine.slots, "generated": generated,
            "finished": finished, "steps": generated // engine.slots,
            "prefill_s": marks["first_token"] - start, "decode_s": decode_s,
            "decode_tokens_per_s": generated / decode_s, "end_to_end_tokens_per_s": generated / (end - start),
            "selection_overlap": stats["selection_overlap"], "offloaded_layers": len(stats["offloaded_layers"]),
            "layer_moves": len(engine.memory.moves),
            "predicted_tokens_per_s": engine.plan.prediction.get("tokens_per_s")}


def hf_workload(model, prompt_len: int, new_tokens: int, steps: int = 5) -> dict:
    """HF's end-to-end tokens/s for the workload, from timed prefill and decode steps (see module doc)."""
    longest = prompt_len + new_tokens
    best = hf_baselines.largest_fitting_batch(model, longest, steps,
                                              hf_baselines.estimate_max_batch(model, longest))
    if best["oom"]:
        return {"hf_error": "no batch fits"}
    batch = best["batch"]
    prefill_s = _hf_prefill_seconds(model, prompt_len)
    contexts = (prompt_len, prompt_len + new_tokens // 2, longest - 1)
    step_ms = [hf_baselines.time_hf_decode(model, batch, c, steps)["step_ms"] for c in contexts[:2]]
    step_ms.append(best["step_ms"])                     # measured at the longest context already
    half = new_tokens / 2
    decode_s = (half * (step_ms[0] + step_ms[1]) / 2 + half * (step_ms[1] + step_ms[2]) / 2) / 1e3
    total_s = batch * prefill_s + decode_s
    return {"hf_batch": batch, "hf_prefill_s_per_request": prefill_s, "hf_step_ms": step_ms,
            "hf_decode_tokens_per_s": batch * new_tokens / decode_s,
            "hf_end_to_end_tokens_per_s": batch * new_tokens / total_s}


def _hf_prefill_seconds(model, prompt_len: int) -> float:
    """One request's prompt through HF's forward (the model's SDPA attention), best of two."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=next(model.parameters()).device)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    torch.cuda.empty_cache()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="16k:2k,32k:2k")
    parser.add_argument("--plans", default="benchmarks/plans")
    parser.add_argument("--max-seconds", type=float, default=1e9,
                        help="stop a workload after this much wall time and report the steps it ran")
    parser.add_argument("--hf", action="store_true", help="measure HF's side of each workload in the same run")
    args = parser.parse_args()
    preset = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets" / "llama-3.1-8b.json"
    model = random_llama(preset, "cuda")
    rows = []
    for item in args.workloads.split(","):
        prompt_len, new_tokens = (parse_tokens(x) for x in item.split(":"))
        try:
            row = run_workload(model, Path(args.plans) / f"wl-{prompt_len}-{new_tokens}", prompt_len, new_tokens,
                               args.max_seconds)
        except Exception as exc:  # one failing workload must not hide the others
            row = {"workload": f"[{prompt_len},{new_tokens}]", "error": str(exc)[:300]}
        gc.collect()
        torch.cuda.empty_cache()
        if args.hf and "error" not in row:
            try:
                row.update(hf_workload(model, prompt_len, new_tokens))
            except Exception as exc:
                row["hf_error"] = str(exc)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()              # the engine holds reference cycles; free its KV store now
        torch.cuda.empty_cache()
    print("\n| [in, out] | requests | decode steps run | prefill s | decode s | decode tok/s | steady decode tok/s "
          "| end-to-end tok/s | overlap | predicted tok/s | HF batch | HF end-to-end tok/s | x HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['workload']} | failed: {r['error'][:80]} | | | | | | | | | | | |")
            continue
        steps = f"{r['steps']}" + ("" if r["finished"] else " (time limit)")
        print(f"| {r['workload']} | {r['requests']} | {steps} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {_rate(r.get('steady_decode_tokens_per_s'))} | "
              f"{r['end_to_end_tokens_per_s']:.1f} | "
              f"{r['selection_overlap'] if r['selection_overlap'] is None else round(r['selection_overlap'], 3)} | "
              f"{r['predicted_tokens_per_s'] and round(r['predicted_tokens_per_s'], 1)} | {_hf_columns(r)} |")


def _rate(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _hf_columns(r: dict) -> str:
    if "hf_end_to_end_tokens_per_s" not in r:
        return f"{r.get('hf_error', '')[:40]} | | "
    hf = r["hf_end_to_end_tokens_per_s"]
    return f"{r['hf_batch']} | {hf:.1f} | {r['end_to_end_tokens_per_s'] / hf:.1f}x"


if __name__ == "__main__":
    main()

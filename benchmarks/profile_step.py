"""Where one captured decode step's time goes on the GPU, piece by piece, against the plan's model.

    python benchmarks/profile_step.py --plan benchmarks/plans/sparse-130560 --context 130560 --out $OUT
    python benchmarks/profile_step.py --plan benchmarks/plans/sparse-130560 --context 130560 --overlap 0.8

Builds the plan's model with random weights (as bench_e2e.py), fills every slot to `context`, replays
the captured step a few times, then profiles more replays with torch.profiler. From the trace it sums
GPU kernel time by piece (retrieval scoring, top-k, elastic diff, host gather, sparse attention, GEMMs,
the rest) and each stream's busy time, and prints them beside the latency model's breakdown at the
selection overlap this run measured (cost_models/plan_prediction.py). --overlap F sets up the
synthetic selection overlap of bench_e2e.py (overlap_control.py: a fixed token, a structured head K
cache) so the copy stream moves what a real model's steps would. Last, one more step is traced
alone and printed as a per-stream timeline (each stream's runs of one piece, start and end in ms
from the step's first kernel): which copy waits for what, and where the critical path runs.
Writes the Chrome traces and a JSON summary to OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overlap_control  # noqa: E402  (benchmark-local module)
from bench_e2e import fill_store_randomly, random_llama  # noqa: E402  (benchmark-local module)

from specontext_compiler.cost_models.plan_prediction import predicted_step  # noqa: E402
from specontext_compiler.runtime.plan import load_plan  # noqa: E402

# Kernel name fragment -> piece; first match wins. Our Triton kernels keep their function names
# (runtime/kernels/); top-k and the elastic diff are torch sort/top-k/search kernels, counted together.
PIECES = [
    ("_logits_kernel", "retrieval scores"), ("_group_max_kernel", "retrieval scores"),
    ("topk", "top-k + diff (torch)"), ("sort", "top-k + diff (torch)"), ("radix", "top-k + diff (torch)"),
    ("bitonic", "top-k + diff (torch)"), ("search", "top-k + diff (torch)"),
    ("_gather_rows_kernel", "host gather"),
    ("_split_kernel", "sparse attention"), ("_combine_kernel", "sparse attention"),
    ("_kv_append_kernel", "KV append"),
    ("gemm", "GEMM"), ("cutlass", "GEMM"), ("nvjet", "GEMM"), ("sm90", "GEMM"), ("cublas", "GEMM"),
]


def piece_of(kernel: str) -> str:
    lowered = kernel.lower()
    return next((piece for fragment, piece in PIECES if fragment in lowered), "other")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us in, ms out)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def trace_kernels(trace_path: Path) -> list[dict]:
    """The kernel events of a chrome trace, in start order."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def summarize(trace_path: Path, replays: int) -> dict:
    """Per piece and per stream GPU time of the traced replays, per step (ms)."""
    kernels = trace_kernels(trace_path)
    per_piece, per_stream = defaultdict(float), defaultdict(list)
    names = defaultdict(float)
    for e in kernels:
        per_piece[piece_of(e["name"])] += e["dur"] / 1e3 / replays
        names[e["name"][:90]] += e["dur"] / 1e3 / replays
        per_stream[e["args"].get("stream", -1)].append((e["ts"], e["ts"] + e["dur"]))
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3 / replays if kernels else 0
    return {"kernels": len(kernels) // max(replays, 1),
            "piece_ms": dict(sorted(per_piece.items(), key=lambda kv: -kv[1])),
            "stream_busy_ms": {str(s): busy_ms(iv) / replays for s, iv in per_stream.items()},
            "span_ms": span,
            "top_kernels_ms": dict(sorted(names.items(), key=lambda kv: -kv[1])[:15])}


def timeline(trace_path: Path, merge_gap_us: float = 30.0) -> list[dict]:
    """One traced step as runs of a piece per stream: [{stream, piece, start_ms, end_ms, kernels}].

    Consecutive kernels of one piece on one stream, less than merge_gap_us apart, form one run;
    times are from the step's first kernel.
    """
    kernels = trace_kernels(trace_path)
    if not kernels:
        return []
    origin, runs, last = kernels[0]["ts"], [], {}
    for e in kernels:
        stream, piece = e["args"].get("stream", -1), piece_of(e["name"])
        start, end = (e["ts"] - origin) / 1e3, (e["ts"] + e["dur"] - origin) / 1e3
        run = last.get(stream)
        if run and run["piece"] == piece and start - run["end_ms"] < merge_gap_us / 1e3:
            run["end_ms"], run["kernels"] = end, run["kernels"] + 1
            continue
        last[stream] = {"stream": stream, "piece": piece, "start_ms": start, "end_ms": end, "kernels": 1}
        runs.append(last[stream])
    return runs


def kernels_between(trace_path: Path, window: str) -> list[dict]:
    """Every kernel of the one-step trace that starts in the window "A,B" (ms from the first)."""
    lo, hi = (float(x) for x in window.split(","))
    kernels = trace_kernels(trace_path)
    origin = kernels[0]["ts"] if kernels else 0
    return [{"stream": e["args"].get("stream", -1), "start_ms": round((e["ts"] - origin) / 1e3, 3),
             "us": round(e["dur"], 1), "name": e["name"][:100]}
            for e in kernels if lo <= (e["ts"] - origin) / 1e3 <= hi]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="benchmarks/plans/sparse-130560")
    parser.add_argument("--context", type=int, default=130560)
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="profile without the CUDA graph")
    parser.add_argument("--gather-programs", type=int, default=None,
                        help="override the host gather's program count (elastic_load.PROGRAMS; -1: one per block)")
    parser.add_argument("--gather-grids", help="programs of the step's gathers in order, e.g. 8x6,32 "
                        "(six at 8, then 32 for the rest); the last value repeats")
    parser.add_argument("--overlap", help="synthetic selection overlap in (0, 1), as bench_e2e.py --overlap")
    parser.add_argument("--list-kernels", metavar="A,B",
                        help="also list every kernel of the traced step that starts between A and B ms")
    parser.add_argument("--out", default=os.environ.get("OUT", "profile_out"))
    args = parser.parse_args()
    if args.overlap is not None:
        try:
            args.overlap = overlap_control.parse_target(args.overlap)
        except ValueError as exc:
            print(f"profile_step.py: --overlap: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return args


def _profiled(step, replays: int, out: Path, tag: str) -> dict:
    """Summary of `replays` profiled steps, with one more step's CUDA timeline."""
    trace = out / f"trace-{tag}.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    summary = summarize(trace, replays)
    one_step = out / f"trace-{tag}-one-step.json"
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(one_step))
    summary["timeline"] = timeline(one_step)
    return summary


def main() -> None:
    args = _arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    preset = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets" / "llama-3.1-8b.json"
    model = random_llama(preset, "cuda")
    engine = load_plan(args.plan).bind(model, use_cuda_graph=not args.eager)
    gather = engine.ctx.kernels.modules["elastic_load"]
    if args.gather_programs is not None:
        gather.PROGRAMS = args.gather_programs
    if args.gather_grids:
        engine.ctx.prefetcher.gather_grids = parse_grids(args.gather_grids)
    fill_store_randomly(engine, args.context)
    if args.overlap is None:
        ids = torch.randint(0, 1000, (engine.slots, 1), device="cuda")
    else:
        overlap_control.prepare_engine(engine, args.context, args.overlap)
        ids = overlap_control.fixed_token_ids(engine.slots, engine.device)

    def step():
        nonlocal ids
        engine.memory.before_step(int(engine.ctx.cache_len.max()))
        logits = engine.step.run(ids, engine.ctx.cache_len.view(-1, 1).clone())
        if args.overlap is None:
            ids = logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(args.warm):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.replays):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.replays

    grid_tag = args.gather_grids.replace(",", "_") if args.gather_grids else gather.PROGRAMS
    tag = (f"{Path(args.plan).name}{'-eager' if args.eager else ''}-g{grid_tag}"
           f"{'' if args.overlap is None else f'-o{args.overlap}'}")
    summary = _profiled(step, args.replays, out, tag)
    if args.list_kernels:
        summary["kernels_window"] = kernels_between(out / f"trace-{tag}-one-step.json", args.list_kernels)
    stats = engine.stats()
    model_step = predicted_step(engine.plan, args.context, stats["selection_overlap"])
    summary.update({"plan": args.plan, "context": args.context, "batch": engine.slots, "eager": args.eager,
                    "overlap_target": args.overlap,
                    "gather_programs": gather.PROGRAMS, "gather_grids": args.gather_grids,
                    "wall_ms_per_step": wall_ms, "overlap": stats["selection_overlap"],
                    "offloaded_layers": len(engine.plan.segment_for(args.context).offloaded_layers),
                    "model": {k: getattr(model_step, k) for k in
                              ("retrieval_ms", "compute_ms", "transfer_ms", "stall_ms", "step_ms", "h2d_bytes_per_step")}})
    (out / f"profile-{tag}.json").write_text(json.dumps(summary, indent=1))
    print_tables(summary)


def parse_grids(text: str, gathers: int = 64) -> tuple[int, ...]:
    """'8x6,32' -> (8, 8, 8, 8, 8, 8, 32, 32, ...): per-gather grids, the last one repeated."""
    grids: list[int] = []
    for part in text.split(","):
        value, _, count = part.partition("x")
        grids += [int(value)] * int(count or 1)
    return tuple(grids + [grids[-1]] * max(0, gathers - len(grids)))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(s: dict) -> None:
    m = s["model"]
    print(f"\n{s['plan']} at {s['context']} tokens, batch {s['batch']}, {s['offloaded_layers']} offloaded layers, "
          f"{'eager' if s['eager'] else 'CUDA graph'}, gather grids {s['gather_grids'] or s['gather_programs']}: "
          f"{s['wall_ms_per_step']:.1f} ms/step wall, overlap {_fmt(s['overlap'], '.3f')}, "
          f"{s['kernels']} kernels/step, kernel span {s['span_ms']:.1f} ms")
    print(f"model at this overlap: retrieval {m['retrieval_ms']:.1f}, compute {m['compute_ms']:.1f}, "
          f"copy stream {m['transfer_ms']:.1f}, stall {m['stall_ms']:.1f}, step {m['step_ms']:.1f} ms; "
          f"H2D {m['h2d_bytes_per_step'] / 1e6:.0f} MB/step")
    print("\n| piece | GPU ms/step |\n|---|---|")
    for piece, ms in s["piece_ms"].items():
        print(f"| {piece} | {ms:.2f} |")
    print("\n| stream | busy ms/step |\n|---|---|")
    for stream, ms in s["stream_busy_ms"].items():
        print(f"| {stream} | {ms:.2f} |")
    print_timeline(s["timeline"])
    for k in s.get("kernels_window", []):
        print(f"  {k['start_ms']:8.3f} ms  {k['us']:8.1f} us  stream {k['stream']}  {k['name']}")


def print_timeline(runs: list[dict]) -> None:
    """The traced step's selection, gather and attention runs, then each stream's span."""
    print("\n| stream | piece | start ms | end ms | kernels |\n|---|---|---|---|---|")
    for run in runs:
        if run["piece"] in ("host gather", "retrieval scores", "top-k + diff (torch)", "sparse attention"):
            print(f"| {run['stream']} | {run['piece']} | {run['start_ms']:.2f} | {run['end_ms']:.2f} | "
                  f"{run['kernels']} |")
    for stream in sorted({r["stream"] for r in runs}, key=str):
        mine = [r for r in runs if r["stream"] == stream]
        print(f"| {stream} | (all) | {mine[0]['start_ms']:.2f} | {mine[-1]['end_ms']:.2f} | "
              f"{sum(r['kernels'] for r in mine)} |")


if __name__ == "__main__":
    main()

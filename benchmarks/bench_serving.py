"""Serving benchmark: requests arriving over time, in the style of vLLM's benchmark_serving.

    python benchmarks/bench_serving.py PLAN [--model DIR | --preset llama-3.1-8b] \
        --requests 64 --rate 4 --input-len 2048 --output-len 256 [--out $OUT]

Requests arrive as a Poisson process at --rate per second (inf: all at once) and go through the
continuous-batching scheduler on its serving thread (runtime/serving_loop.py), in-process, with no
HTTP in between. Prompts are random token ids, decoding is greedy and ignores end-of-sequence, so
every request generates exactly its output length. Reports time to first token (TTFT), time per
output token after the first (TPOT), end-to-end latency, request and output-token throughput.
--wave-baseline also serves the same requests in fixed waves of the engine's slots (each wave
waits for its longest request), the schedule before continuous batching. Prints a table last and
writes bench_serving.json to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specontext_compiler.runtime.plan import load_plan  # noqa: E402
from specontext_compiler.runtime.sampling_params import SamplingParams  # noqa: E402
from specontext_compiler.runtime.serving_loop import ServingLoop  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets"


def make_requests(count: int, input_len: int, output_len: int, spread: float, vocab: int, seed: int):
    """(prompt ids, output length) pairs; lengths uniform in [len * (1 - spread), len]."""
    rng = random.Random(seed)

    def length(n):
        return max(1, rng.randint(int(n * (1 - spread)), n))
    return [([rng.randrange(10, vocab) for _ in range(length(input_len))], length(output_len))
            for _ in range(count)]


async def one_request(loop: ServingLoop, prompt: list[int], output_len: int, delay_s: float, t0: float) -> dict:
    await asyncio.sleep(delay_s)
    sent = time.perf_counter()
    times = []
    async for out in loop.stream(prompt, SamplingParams(max_tokens=output_len, ignore_eos=True)):
        if out.error:
            return {"error": out.error}
        if out.token_id is not None:
            times.append(time.perf_counter())
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"sent_s": sent - t0, "ttft_s": times[0] - sent, "tpot_s": tpot, "e2e_s": times[-1] - sent,
            "prompt_tokens": len(prompt), "output_tokens": len(times)}


async def serve_all(engine, requests, rate: float, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed + 1)
    delays, now = [], 0.0
    for _ in requests:
        delays.append(now)
        now += rng.expovariate(rate) if rate != float("inf") else 0.0
    loop = ServingLoop(engine, idle_wait_s=0.001).start()
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(loop, p, n, d, t0) for (p, n), d in zip(requests, delays)))
        return results, time.perf_counter() - t0
    finally:
        loop.stop()


def waves(engine, requests) -> float:
    """Seconds to serve the requests in fixed waves of engine.slots, all present at the start."""
    start = time.perf_counter()
    for i in range(0, len(requests), engine.slots):
        wave = requests[i:i + engine.slots]
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in wave]
        handles = [engine.scheduler.add(p, s) for (p, _), s in zip(wave, params)]
        while not all(h.finished for h in handles):
            engine.scheduler.step()
    _sync(engine)
    return time.perf_counter() - start


def summary(results: list[dict], duration_s: float) -> dict:
    ok = [r for r in results if "error" not in r]

    def ms(key, q):
        values = sorted(r[key] * 1e3 for r in ok if r[key] is not None)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None
    tokens = sum(r["output_tokens"] for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "duration_s": duration_s,
            "request_per_s": len(ok) / duration_s, "output_tokens_per_s": tokens / duration_s,
            "total_tokens_per_s": (tokens + sum(r["prompt_tokens"] for r in ok)) / duration_s,
            "ttft_ms_mean": statistics.mean(r["ttft_s"] * 1e3 for r in ok) if ok else None,
            "ttft_ms_p50": ms("ttft_s", 0.5), "ttft_ms_p99": ms("ttft_s", 0.99),
            "tpot_ms_mean": statistics.mean(r["tpot_s"] * 1e3 for r in ok if r["tpot_s"]) if ok else None,
            "tpot_ms_p50": ms("tpot_s", 0.5), "tpot_ms_p99": ms("tpot_s", 0.99),
            "e2e_ms_p50": ms("e2e_s", 0.5)}


def bind(args):
    plan = load_plan(args.plan)
    if args.preset:
        from bench_e2e import random_llama
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = random_llama(PRESETS / f"{args.preset}.json", device)
        if device == "cpu":
            model = model.float()
    else:
        from specontext_compiler.serve import resolve_model
        model = resolve_model(plan, args.model)
    return plan.bind(model, batch=args.batch)


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--model", help="weights directory (default: the plan's recorded source)")
    parser.add_argument("--preset", help="random weights for this preset instead (e.g. llama-3.1-8b)")
    parser.add_argument("--batch", type=int, help="request slots (default: the plan's batch)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=float("inf"), help="arrivals per second (Poisson)")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--spread", type=float, default=0.5, help="lengths uniform in [len*(1-spread), len]")
    parser.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill chunk (default: the engine's)")
    parser.add_argument("--wave-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    engine = bind(args)
    if args.prefill_chunk:
        engine.prefill_chunk = args.prefill_chunk
    vocab = engine.vocab_size or 32000
    requests = make_requests(args.requests, args.input_len, args.output_len, args.spread, vocab, args.seed)
    warm = make_requests(min(engine.slots, 2), min(64, args.input_len), 4, 0.0, vocab, args.seed + 7)
    asyncio.run(serve_all(engine, warm, float("inf"), args.seed))     # capture graphs, compile kernels
    results, duration = asyncio.run(serve_all(engine, requests, args.rate, args.seed))
    report = {"plan": str(args.plan), "slots": engine.slots, "rate": args.rate, "input_len": args.input_len,
              "output_len": args.output_len, "spread": args.spread, **summary(results, duration)}
    if args.wave_baseline:
        report["wave_duration_s"] = waves(engine, requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_serving.json").write_text(json.dumps({"summary": report, "requests": results}, indent=1))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("| metric | value |\n|---|---|")
    for key, value in report.items():
        print(f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()

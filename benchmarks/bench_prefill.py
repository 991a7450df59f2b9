"""Prefill throughput on one GPU: the engine's prefill beside Hugging Face's own SDPA forward, same model.

    TARGET=h200 bash benchmarks/compile_bench_plans.sh e2e      # here (needs PuLP); carry benchmarks/plans
    python benchmarks/bench_prefill.py --plans benchmarks/plans --out $OUT
    python benchmarks/bench_prefill.py --names dense-32768 --lengths 32k --chunk 8192   # a chunked prefill

Model: Llama-3.1-8B shape (--preset), bf16, random weights (bench_e2e.random_llama), HF attention
through SDPA. Without a GPU it runs on the CPU in fp32 (the test's tiny model: the same code path).
Each plan is bound with batch=1 to the same model (the engine's graph reads the same weight tensors).
Per plan and prompt length, one request through engine.generate(prompt, max_new_tokens=1): the
scheduler's prefill (in the plan's prefill_chunk_tokens per forward, or --chunk) and the first token
sampled. HF: model(ids, use_cache=True, logits_to_keep=1), as HF's generate prefills. Median of
--repeats timed runs after one warm-up. Goal: ours within 1.25x of HF (ours/HF tok/s >= 0.8).
Prints a markdown table last; writes OUT/bench_prefill.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import random_llama  # noqa: E402  (benchmark-local helper module)

from specontext_compiler.errors import SpecontextError  # noqa: E402
from specontext_compiler.runtime.plan import load_plan  # noqa: E402
from specontext_compiler.sizes import parse_tokens  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "specontext_compiler" / "presets"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(run, repeats: int) -> float:
    """Median wall time of run() over `repeats` calls after one warm-up, the GPU synchronized around each."""
    run()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_hf(model, prompt: torch.Tensor, repeats: int) -> dict:
    """HF's own prefill of one prompt: SDPA attention, a DynamicCache, the last token's logits."""
    def run():
        with torch.inference_mode():
            out = model(input_ids=prompt.view(1, -1), use_cache=True, logits_to_keep=1)
            out.logits[0, -1].argmax().item()
    return _measured("HF sdpa", prompt.numel(), lambda: median_seconds(run, repeats))


def time_engine(engine, name: str, prompt: torch.Tensor, repeats: int) -> dict:
    """The engine's prefill of one prompt through the scheduler (first token sampled and read)."""
    ids = prompt.tolist()
    chunks_before = engine.scheduler.prefill_chunks

    def run():
        engine.generate([ids], max_new_tokens=1, stop_at_eos=False)
    row = _measured(f"specontext {name}", len(ids), lambda: median_seconds(run, repeats))
    row["chunk"] = engine.prefill_chunk
    row["forwards_per_prompt"] = (engine.scheduler.prefill_chunks - chunks_before) / (repeats + 1)
    row["offloaded_layers"] = len(engine.ctx.store.offloaded_layers())
    return row


def _measured(method: str, tokens: int, measure) -> dict:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = measure()
    except torch.cuda.OutOfMemoryError as exc:
        return {"method": method, "prompt": tokens, "error": f"out of GPU memory: {str(exc)[:120]}"}
    return {"method": method, "prompt": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else 0.0}


def bind(plans: Path, name: str, model, chunk: int | None):
    engine = load_plan(plans / name).bind(model, batch=1)
    if chunk:
        engine.prefill_chunk = chunk          # before the scheduler exists: it reads the chunk once
    return engine


def build_model(preset: str):
    """Random weights of the preset's shape: bf16 on the GPU, fp32 on the CPU; attention through SDPA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(PRESETS / f"{preset}.json", device)
    model = model if device == "cuda" else model.float()
    model.set_attn_implementation("sdpa")
    return model


def run(args) -> list[dict]:
    model = build_model(args.preset)
    lengths = [parse_tokens(x, "--lengths") for x in args.lengths.split(",")]
    device = next(model.parameters()).device
    prompts = {n: torch.randint(0, model.config.vocab_size, (n,), device=device) for n in lengths}
    rows = [time_hf(model, prompts[n], args.repeats) for n in lengths]
    for name in args.names.split(","):
        engine = bind(Path(args.plans), name, model, args.chunk)
        for n in lengths:
            if n + 1 > engine.max_len:
                rows.append({"method": f"specontext {name}", "prompt": n,
                             "error": f"prompt + 1 token exceeds the plan's max-len {engine.max_len}"})
                continue
            rows.append(time_engine(engine, name, prompts[n], args.repeats))
            print(json.dumps(rows[-1]), flush=True)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    hf = {r["prompt"]: r.get("tokens_per_s") for r in rows if r["method"] == "HF sdpa"}
    print("\n| prompt | method | tokens per forward | offloaded layers | s | tok/s | ours / HF | peak GPU GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['prompt']} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        base = hf.get(r["prompt"])
        share = f"{r['tokens_per_s'] / base:.2f}" if base and r["method"] != "HF sdpa" else ""
        per_forward = r["prompt"] / r["forwards_per_prompt"] if r.get("forwards_per_prompt") else r["prompt"]
        print(f"| {r['prompt']} | {r['method']} | {per_forward:.0f} | {r.get('offloaded_layers', '')} | "
              f"{r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {share} | {r['peak_gpu_gb']:.1f} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-8b", help="model shape, random weights")
    parser.add_argument("--plans", default="benchmarks/plans", help="folder of plans compiled with this branch")
    parser.add_argument("--names", default="dense1-32768,dense-32768,sparse-32768", help="plan folders in --plans")
    parser.add_argument("--lengths", default="8192,32768", help="prompt lengths (8k, 32k, ...)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, help="override the plans' prefill_chunk_tokens")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args(argv)
    try:
        rows = run(args)
    except SpecontextError as exc:
        print(f"bench_prefill.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "preset": args.preset, "chunk_override": args.chunk}
    (out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()

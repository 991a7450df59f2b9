"""Sweep the sparse-decode split kernel's launch on the GPU at the plans' shapes: GB/s of selected rows.

    python3 benchmarks/bench_sparse_decode.py --out $OUT      # on the GPU machine, ~2 min

Llama-3.1-8B attention (32 query / 8 KV heads, head dim 128, bf16), 2064 selected rows per KV
head (budget 2048 + sink + recent window) scattered over the cache, at the 128k batch-7 and the
32k batch-28 plans' shapes. For each (programs per launch target, warps, pipeline stages) the
kernel pair (split + combine) is timed as CUDA-graph replays (how the runtime runs it) and
reported against the bytes it must read (sparse_decode_bytes). Prints a table last, best first per
shape; writes bench_sparse_decode.json to --out. The kernel's module constants are set per case
(_TARGET_PROGRAMS, _SPLIT_WARPS, _SPLIT_STAGES, _DOT_BLOCK_W); the defaults are the first row of
each shape.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import triton.testing

from specontext_compiler.runtime.kernels import sparse_decode as sd

SHAPES = {"128k batch 7": (7, 131072), "32k batch 28": (28, 33280)}
HEADS, KV_HEADS, DIM, WIDTH = 32, 8, 128, 2064


def inputs(batch: int, seq: int):
    dev, bf16 = "cuda", torch.bfloat16
    q = torch.randn(batch, HEADS, DIM, device=dev, dtype=bf16)
    k = torch.randn(batch, KV_HEADS, seq, DIM, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    # rows in score order, as the top-k returns them: scattered, unsorted
    idx = torch.stack([torch.randperm(seq, device=dev)[:WIDTH] for _ in range(batch * KV_HEADS)])
    idx = idx.view(batch, KV_HEADS, WIDTH).int()
    k_new = torch.randn(batch, KV_HEADS, DIM, device=dev, dtype=bf16)
    return q, k, v, idx, k_new, torch.randn_like(k_new)


def time_case(args, programs: int, warps: int, stages, block_w: int) -> float:
    sd._TARGET_PROGRAMS, sd._SPLIT_WARPS, sd._SPLIT_STAGES, sd._DOT_BLOCK_W = programs, warps, stages, block_w
    fn = lambda: sd.sparse_decode(*args, 0.088)       # noqa: E731
    fn()
    return triton.testing.do_bench_cudagraph(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default="264,528,1056")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="0,3", help="0: Triton's default")
    parser.add_argument("--block-w", default="32,64,128", help="selected rows per tensor-core step")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    opts = parser.parse_args()
    defaults = (sd._TARGET_PROGRAMS, sd._SPLIT_WARPS, sd._SPLIT_STAGES or 0, sd._DOT_BLOCK_W)
    grid = [defaults] + [c for c in itertools.product(*(map(int, getattr(opts, n).split(","))
                                                         for n in ("programs", "warps", "stages", "block_w")))
                         if c != defaults]
    rows = []
    for shape, (batch, seq) in SHAPES.items():
        args = inputs(batch, seq)
        reference = sd.sparse_decode_reference(*args, 0.088).float()
        nbytes = sd.sparse_decode_bytes(args[0], args[1], args[2], args[3])
        for programs, warps, stages, block_w in grid:
            case = {"shape": shape, "programs": programs, "warps": warps, "stages": stages, "block_w": block_w}
            try:
                ms = time_case(args, programs, warps, stages or None, block_w)
                error = (sd.sparse_decode(*args, 0.088).float() - reference).abs().max().item()
            except Exception as exc:          # a launch that does not fit (shared memory): say so
                rows.append({**case, "error": str(exc).splitlines()[0][:80]})
                continue
            rows.append({**case, "us": ms * 1e3, "gbps": nbytes / ms / 1e6, "max_abs_diff": error,
                         "default": (programs, warps, stages, block_w) == defaults})
            print(json.dumps(rows[-1]), flush=True)
        del args
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / "bench_sparse_decode.json").write_text(json.dumps(rows, indent=1))
    print("\n| shape | target programs | warps | stages (0 = default) | rows a step | us | GB/s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        timed = sorted((r for r in rows if r["shape"] == shape and "us" in r), key=lambda r: r["us"])
        for r in [next(r for r in timed if r["default"])] + timed[:5]:
            mark = " (default)" if r["default"] else ""
            print(f"| {shape} | {r['programs']}{mark} | {r['warps']} | {r['stages']} | {r['block_w']} | {r['us']:.1f} | "
                  f"{r['gbps']:.0f} | {r['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()

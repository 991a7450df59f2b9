"""How much the elastic gather slows a decode step's kernels running beside it, and why.

    python benchmarks/bench_gather_interference.py --out $OUT      # on the GPU machine, ~2 minutes

The 128k step's profile shows the resident layers running ~3x slower while the gathers run than
after them. This times a decode-like HBM-bound loop (batch-11 GEMMs over 235 MB of weights plus an
elementwise pass) alone and while the gather loops on another stream, for gather variants that
separate the candidate causes: the row layout (K and V apart or adjacent), where the rows lie
(random over the whole history, or within a 2 MB window per row: few pages to translate), how the
host memory was pinned (torch's pinned allocator, or transparent huge pages registered with
cudaHostRegister), and the grid. Prints a markdown table last; JSON to OUT.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gather import step_loads, time_ms  # noqa: E402  (benchmark-local module)

from specontext_compiler.runtime.kernels import elastic_load as el  # noqa: E402

BATCH, HEADS, SEQ, WIDTH, DIM = 11, 8, 130560, 2065, 128


def huge_page_tensor(shape, dtype) -> torch.Tensor:
    """Host memory from an anonymous mapping advised to transparent huge pages, then page-locked."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(area, dtype=dtype).view(shape)
    tensor._keep_mapping = area                       # the mapping lives as long as the tensor
    code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(code) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {code}")
    return tensor


def host_kv(layout: str, pinning: str):
    """Host K, V [B, H, S, D] views, filled with a random pattern."""
    shape = (BATCH, HEADS, SEQ, 2 * DIM) if layout == "adjacent" else (2, BATCH, HEADS, SEQ, DIM)
    store = (huge_page_tensor(shape, torch.bfloat16) if pinning == "thp+register"
             else torch.empty(shape, dtype=torch.bfloat16, pin_memory=True))
    flat, pattern = store.view(-1), torch.randn(1 << 24).to(torch.bfloat16)
    for start in range(0, flat.numel(), pattern.numel()):
        part = flat[start:start + pattern.numel()]
        part.copy_(pattern[:part.numel()])
    return (store[..., :DIM], store[..., DIM:]) if layout == "adjacent" else (store[0], store[1])


def local_loads(loads: el.CompactLoads, window: int = 4096) -> el.CompactLoads:
    """The same rows and slots, positions folded into the first `window` positions of each row."""
    entries = loads.entries.clone()
    entries[1] = torch.where(entries[1] >= 0, entries[1] % window, entries[1])
    return el.CompactLoads(entries, loads.count)


class DecodeLoad:
    """Batch-11 GEMMs over 235 MB of bf16 weights and an elementwise pass: HBM-bound like decode."""

    def __init__(self, device):
        self.x = torch.randn(BATCH, 4096, device=device, dtype=torch.bfloat16)
        self.w = torch.randn(4096, 28672, device=device, dtype=torch.bfloat16)
        self.a = torch.randn(32 << 20, device=device, dtype=torch.bfloat16)

    def run(self, iterations: int = 20):
        for _ in range(iterations):
            (self.x @ self.w).sum()
            self.a.mul_(1.0001)


def measure(variant: dict, decode: DecodeLoad, buf_k, buf_v, loads, repeats: int) -> dict:
    host_k, host_v = host_kv(variant["layout"], variant["pinning"])
    rows = local_loads(loads) if variant["positions"] == "local" else loads
    copy = (lambda: el.gather_compact(host_k, host_v, buf_k, buf_v, rows, HEADS, programs=variant["programs"]))
    gather_alone = time_ms(copy, repeats)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):         # queued ahead: gathers outlast the timed decode loops
        for _ in range(repeats * 8):
            copy()
    decode_beside = time_ms(decode.run, repeats)
    side.synchronize()
    nbytes = int(loads.count) * 2 * DIM * 2
    return {**variant, "gather_ms": gather_alone, "gather_gbps": nbytes / gather_alone / 1e6,
            "decode_ms_beside": decode_beside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    device = torch.device("cuda")
    loads = step_loads(BATCH, HEADS, SEQ, WIDTH, 0.8, device)
    buf_k, buf_v = (torch.randn(BATCH, HEADS, WIDTH, DIM, device=device, dtype=torch.bfloat16) for _ in "kv")
    decode = DecodeLoad(device)
    decode_alone = time_ms(decode.run, args.repeats)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"transparent huge pages: {thp.read_text().strip() if thp.exists() else 'unknown'}")
    variants = [dict(layout="separate", positions="random", pinning="torch", programs=16),
                dict(layout="adjacent", positions="random", pinning="torch", programs=16),
                dict(layout="adjacent", positions="local", pinning="torch", programs=16),
                dict(layout="adjacent", positions="random", pinning="torch", programs=4),
                dict(layout="adjacent", positions="random", pinning="torch", programs=33),
                dict(layout="adjacent", positions="random", pinning="thp+register", programs=16)]
    rows = []
    for variant in variants:
        try:
            rows.append(measure(variant, decode, buf_k, buf_v, loads, args.repeats))
        except (RuntimeError, OSError, ValueError) as exc:
            rows.append({**variant, "error": str(exc)[:120]})
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gather_interference.json").write_text(
        json.dumps({"decode_ms_alone": decode_alone, "rows": rows}, indent=1))
    print(f"\ndecode loop alone: {decode_alone:.3f} ms")
    print("| layout | positions | pinning | programs | gather ms alone | GB/s | decode ms beside | slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layout']} | {r['positions']} | {r['pinning']} | {r['programs']} | {r['error']} | | | |")
            continue
        print(f"| {r['layout']} | {r['positions']} | {r['pinning']} | {r['programs']} | {r['gather_ms']:.3f} | "
              f"{r['gather_gbps']:.1f} | {r['decode_ms_beside']:.3f} | {r['decode_ms_beside'] / decode_alone:.2f}x |")


if __name__ == "__main__":
    main()

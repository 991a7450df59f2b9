"""`specontext targets --probe`: measure this machine's GPU the way the runtime uses it, write a target.

    specontext targets --probe -o my-gpu.toml          # then: specontext compile ... --target-file my-gpu.toml
    python -m specontext_compiler.targets_probe -o my-gpu.toml [--compare h200]   # without typer/rich

Each figure of the target file comes from one measurement here, and its [sources] entry (and the
comment beside it) names the measurement, the date and the device:
- HBM rate: a 2 GiB device-to-device copy (read + write counted), as hbm_gbps is defined;
- pinned H2D / D2H: 512 MiB copies between pinned host memory and the GPU;
- the pinned gather: the runtime's own elastic gather (runtime/kernels/elastic_load.py, default
  grid) copying one step's rows at the runtime's row size (one KV head of one token: D = 128 bf16,
  256 bytes each for K and V) from pinned host memory, alone and beside a decode-like loop (a
  batch-11 bf16 GEMV over a 224 MiB weight, HBM-bound like a decode layer) on another stream,
  and that loop's slowdown beside the gather: the step DAG's contention figures. The rows are
  drawn from a long context's span of host memory (about half of it, as a 128k plan pins); the
  rate from a 1 GiB span is given beside it in the source, since the two can differ;
- decode_hbm_efficiency: the decode-like loop's read rate over the copy rate;
- bf16 rate: 8192^3 matmuls; layer_fixed_us: a CUDA-graph replay of the ~45 small kernels a decoder
  layer runs (norms, RoPE, adds; profile_step.py) on a [11, 4096] activation; launch_overhead_us:
  the host's time to launch one graph replay; memories: cudaMemGetInfo and /proc/meminfo.
Imports torch and triton only (the GPU machine has no PuLP); ~1 minute on an H200.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from specontext_compiler.errors import SpecontextError

GATHER_SHAPE = {"batch": 8, "heads": 8, "seq": 32768, "dim": 128, "width": 2065, "overlap": 0.8}
DECODE_BATCH, DECODE_IN, DECODE_OUT = 11, 4096, 28672       # 224 MiB bf16 weight: an 8B layer's MLP
SMALL_KERNELS_PER_LAYER = 45
LARGE_SPAN_SHARE = 0.3       # of host memory, for each of host K and V in the long-span gather


@dataclass(frozen=True)
class Figure:
    key: str
    value: float | int
    how: str        # the measurement, for the sources table


def require_cuda() -> None:
    """One-line refusal where there is no CUDA GPU to measure."""
    import torch
    if not torch.cuda.is_available():
        raise SpecontextError("--probe measures a CUDA GPU and this machine has none; run "
                              "`specontext targets --probe -o my-gpu.toml` on the GPU machine")


def time_ms(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median of event-timed calls of fn on the current stream."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe_memory(device) -> list[Figure]:
    import torch
    total = torch.cuda.mem_get_info(device)[1]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    found = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    host = int(found.group(1)) * 1024 if found else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [Figure("gpu_memory_bytes", int(total), "cudaMemGetInfo total"),
            Figure("host_memory_bytes", host, "/proc/meminfo MemTotal" if found else "sysconf physical pages")]


def probe_copies(device) -> list[Figure]:
    """HBM rate (device copy, read + write) and pinned H2D / D2H rates."""
    import torch
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    hbm_ms = time_ms(lambda: dst.copy_(src))
    hbm = 2 * src.numel() * 2 / hbm_ms / 1e6
    del src, dst
    host = torch.empty(256 << 20, dtype=torch.bfloat16, pin_memory=True).normal_()
    dev = torch.empty_like(host, device=device)
    nbytes = host.numel() * 2
    h2d = nbytes / time_ms(lambda: dev.copy_(host, non_blocking=True)) / 1e6
    d2h = nbytes / time_ms(lambda: host.copy_(dev, non_blocking=True)) / 1e6
    return [Figure("hbm_gbps", round(hbm, 1), "2 GiB bf16 device-to-device copy, read + write counted"),
            Figure("h2d_gbps", round(h2d, 2), "512 MiB pinned host -> device copy"),
            Figure("d2h_gbps", round(d2h, 2), "512 MiB device -> pinned host copy")]


def probe_bf16(device) -> Figure:
    import torch
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in "ab")
    ms = time_ms(lambda: a @ b)
    return Figure("bf16_tflops", round(2 * 8192 ** 3 / ms / 1e9, 1), "8192^3 bf16 matmul, random data")


class _DecodeLoop:
    """A decode-like HBM-bound op: a batch-11 bf16 GEMV over a 224 MiB weight."""

    def __init__(self, device):
        import torch
        self.x = torch.randn(DECODE_BATCH, DECODE_IN, device=device, dtype=torch.bfloat16)
        self.w = torch.randn(DECODE_OUT, DECODE_IN, device=device, dtype=torch.bfloat16)
        self.bytes = self.w.numel() * 2

    def __call__(self):
        import torch
        return torch.nn.functional.linear(self.x, self.w)


class _Gather:
    """One step of the runtime's elastic gather for GATHER_SHAPE, from pinned host memory.

    seq: positions per (request, head) in the host K and V (GATHER_SHAPE's by default); the
    rows are drawn from all of them, so it sets the host span the gather reads across."""

    def __init__(self, device, seq: int | None = None):
        import torch

        from specontext_compiler.runtime.kernels import elastic_load
        s = {**GATHER_SHAPE, "seq": seq or GATHER_SHAPE["seq"]}
        rows, per_row = s["batch"] * s["heads"], round((1 - s["overlap"]) * s["width"])
        # K and V of one (token, head) side by side in one pinned tensor, as runtime/kv_store.py
        # keeps offloaded history (pinned on CUDA; the CPU is for tests).
        self.host = torch.empty(s["batch"], s["heads"], s["seq"], 2 * s["dim"], dtype=torch.bfloat16,
                                pin_memory=device.type == "cuda")
        self.host.view(-1)[: 1 << 24].normal_()   # the rest stays as allocated: the copy's speed ignores values
        self.host_k, self.host_v = self.host[..., :s["dim"]], self.host[..., s["dim"]:]
        self.span_bytes = self.host.numel() * 2
        self.buf_k, self.buf_v = (torch.zeros(s["batch"], s["heads"], s["width"], s["dim"], device=device,
                                              dtype=torch.bfloat16) for _ in "kv")
        pos = torch.full((rows, s["width"]), -1, dtype=torch.int32, device=device)
        slot = torch.full_like(pos, -1)
        for r in range(rows):      # (1 - overlap) of the budget moves: random positions into random slots
            pos[r, :per_row] = torch.randperm(s["seq"], device=device)[:per_row].to(torch.int32)
            slot[r, :per_row] = torch.randperm(s["width"], device=device)[:per_row].to(torch.int32)
        shape = (s["batch"], s["heads"], s["width"])
        self.loads = elastic_load.compact_loads(pos.view(shape), slot.view(shape))
        self.count = rows * per_row
        self.bytes = self.count * 2 * s["dim"] * 2      # K and V rows read over PCIe
        self._gather = elastic_load.gather_compact

    def __call__(self):
        self._gather(self.host_k, self.host_v, self.buf_k, self.buf_v, self.loads, GATHER_SHAPE["heads"])


def _beside(timed, other, other_ms: float, repeats: int = 10) -> float:
    """Median time of timed() while other() keeps a second stream busy (queued to outlast it)."""
    import torch
    side = torch.cuda.Stream()
    timed_ms = time_ms(timed, repeats=2)
    count = int((repeats + 4) * timed_ms / max(other_ms, 1e-3) * 1.5) + 8
    with torch.cuda.stream(side):
        for _ in range(count):
            other()
    ms = time_ms(timed, repeats=repeats)
    side.synchronize()
    return ms


def large_span_seq(host_bytes: int) -> int:
    """Positions that make host K and V each the largest power of two <= 0.3 of host memory (32 GiB
    each on a 128 GiB host; together under the planner's pinnable 0.65): a long context's span.
    Powers of two, since PyTorch's pinned-memory cache may round an allocation up to one."""
    s = GATHER_SHAPE
    per_tensor = 1 << max(0, int(host_bytes * LARGE_SPAN_SHARE).bit_length() - 1)
    return max(s["seq"], per_tensor // (s["batch"] * s["heads"] * s["dim"] * 2))


def probe_contention(device, hbm_gbps: float, host_bytes: int) -> list[Figure]:
    """The runtime's gather alone (small and long-context host spans), beside decode-like compute
    (long span), and that compute's slowdown beside it."""
    small = _Gather(device)
    small_gbps, small_span = small.bytes / time_ms(small) / 1e6, small.span_bytes
    del small
    gather, decode = _Gather(device, seq=large_span_seq(host_bytes)), _DecodeLoop(device)
    gather_ms, decode_ms = time_ms(gather), time_ms(decode)
    gather_beside_ms = _beside(gather, decode, decode_ms)
    decode_beside_ms = _beside(decode, gather, gather_ms)
    s = GATHER_SHAPE
    what = (f"the runtime's elastic gather (elastic_load.gather_compact, default grid), {s['dim']}-wide bf16 "
            f"K and V rows (256 B each), batch {s['batch']} x {s['heads']} KV heads x "
            f"{round((1 - s['overlap']) * s['width'])} rows drawn from {gather.span_bytes / 2**30:.0f} GiB of "
            f"pinned host K and V ({small_gbps:.1f} GB/s alone from {small_span / 2**30:.0f} GiB)")
    loop = f"a decode-like loop (batch-{DECODE_BATCH} bf16 GEMV over a {decode.bytes >> 20} MiB weight)"
    decode_rate = decode.bytes / decode_ms / 1e6
    return [Figure("pinned_gather_gbps", round(gather.bytes / gather_ms / 1e6, 2), f"{what}, alone"),
            Figure("gather_gbps_beside_compute", round(gather.bytes / gather_beside_ms / 1e6, 2),
                   f"{what}, beside {loop} on another stream"),
            Figure("compute_slowdown_beside_gather", round(max(1.0, decode_beside_ms / decode_ms), 3),
                   f"{loop}: time beside the gather / alone ({decode_beside_ms:.3f} / {decode_ms:.3f} ms)"),
            Figure("decode_hbm_efficiency", round(min(1.0, decode_rate / hbm_gbps), 3),
                   f"{loop} reads {decode_rate:.0f} GB/s, over hbm_gbps (capped at 1)")]


def probe_small_kernels(device) -> list[Figure]:
    """Per-layer fixed time (a graph of small kernels) and the host's cost of one graph launch."""
    import torch
    x = torch.randn(DECODE_BATCH, DECODE_IN, device=device, dtype=torch.bfloat16)
    y = x.clone()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        y.mul_(1.0)          # warm the kernels up outside the capture
        y.add_(x)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for i in range(SMALL_KERNELS_PER_LAYER):
            y.mul_(0.5) if i % 2 else y.add_(x)
    per_layer_us = time_ms(lambda: [graph.replay() for _ in range(20)]) / 20 * 1e3
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        graph.replay()
    launch_us = (time.perf_counter() - start) / 200 * 1e6
    torch.cuda.synchronize()
    return [Figure("layer_fixed_us", round(per_layer_us, 1),
                   f"CUDA-graph replay of {SMALL_KERNELS_PER_LAYER} small elementwise kernels on a "
                   f"[{DECODE_BATCH}, {DECODE_IN}] bf16 activation (a decoder layer's small kernels)"),
            Figure("launch_overhead_us", round(launch_us, 1), "host time of one CUDA-graph replay call")]


def probe(progress=lambda line: None) -> tuple[str, list[Figure]]:
    """(device name, figures) of the current CUDA device; SpecontextError without one."""
    require_cuda()
    import torch
    device = torch.device("cuda", torch.cuda.current_device())
    figures = probe_memory(device)
    progress("copies (HBM, pinned H2D / D2H)")
    figures += probe_copies(device)
    progress("bf16 matmul")
    figures.append(probe_bf16(device))
    progress("the runtime's gather, alone and beside decode-like compute (pins ~half the host memory)")
    hbm = next(f.value for f in figures if f.key == "hbm_gbps")
    host = next(f.value for f in figures if f.key == "host_memory_bytes")
    figures += probe_contention(device, hbm, host)
    progress("small kernels and graph launches")
    figures += probe_small_kernels(device)
    return torch.cuda.get_device_name(device), figures


def _toml_value(value) -> str:
    return f"{value:_}" if isinstance(value, int) else repr(float(value))


def target_toml(name: str, device: str, figures: list[Figure], date: str | None = None) -> str:
    """A target file: one line per figure with its source as a comment, and a [sources] table."""
    date = date or datetime.date.today().isoformat()
    origin = f"specontext targets --probe, {date}, {device}"
    lines = [f"# {device}: measured by `specontext targets --probe` on {date}.",
             "# Figures the probe does not measure keep their defaults (see cost_models/target.py).",
             f'name = "{name}"', "aliases = []"]
    lines += [f"{f.key} = {_toml_value(f.value)}   # probe: {f.how}" for f in figures]
    lines += ["", "[sources]"]
    lines += [f'{f.key} = "{origin}: {f.how}"'.replace("\\", "/") for f in figures]
    return "\n".join(lines) + "\n"


def target_name(device: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200-probe'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + "-probe"


def check_output(path: Path | None) -> None:
    """Refuse to overwrite a file (the probe never replaces what it did not write)."""
    if path is not None and path.exists():
        raise SpecontextError(f"{path} exists; choose another -o path or move that file away")
    if path is not None and not path.parent.is_dir():
        raise SpecontextError(f"directory {path.parent} does not exist; create it first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, help="target TOML to write (default: print it)")
    parser.add_argument("--compare", help="a built-in target to print beside the probed figures")
    args = parser.parse_args(argv)
    try:
        check_output(args.out)
        device, figures = probe(lambda line: print(f"probing {line} ...", file=sys.stderr))
    except SpecontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = target_toml(target_name(device), device, figures)
    if args.out:
        args.out.write_text(text)
    print(text if not args.out else f"wrote {args.out}")
    print(comparison_table(figures, args.compare))
    return 0


def _builtin_value(builtin, key: str) -> str:
    value = getattr(builtin, key, None) if builtin is not None else None
    return "" if builtin is None else ("-" if value is None else f"{value:,}")


def comparison_table(figures: list[Figure], compare: str | None) -> str:
    """Markdown: each probed figure, and the built-in target's where one is named."""
    builtin = None
    if compare:
        from specontext_compiler.cost_models.target import load_target
        builtin = load_target(compare)
    head = f"| figure | probed | {builtin.name if builtin else ''} |\n|---|---|---|"
    rows = [f"| {f.key} | {f.value:,} | {_builtin_value(builtin, f.key)} |" for f in figures]
    return "\n".join([head, *rows])


if __name__ == "__main__":
    sys.exit(main())

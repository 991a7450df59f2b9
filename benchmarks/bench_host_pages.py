"""The elastic gather's rate against the page size of the pinned host memory it reads.

    python benchmarks/bench_host_pages.py --out $OUT          # on the GPU machine, ~3 minutes

The runtime's gather (elastic_load.gather_compact, default grid) reads scattered 512-byte (token,
head) runs of K and V from pinned host memory. From a 1 GiB span it reached 36.9 GB/s on the H200,
from 64 GiB 22.7 GB/s (targets/h200.toml's sources): the rows are the same, only the span differs,
which points at address translation of host pages (the GPU's and the IOMMU's TLBs), not at PCIe.
This times one step of the 128k plan's gather (batch 11, 8 KV heads, head_dim 128, overlap 0.8)
from host memory allocated four ways, at a small and a long-context span:
  pinned      torch pin_memory (cudaHostAlloc; 4 KiB pages unless the driver finds better)
  thp         anonymous mmap + madvise(MADV_HUGEPAGE), touched, then cudaHostRegister
  hugetlb-2m  mmap(MAP_HUGETLB) from the 2 MiB pool (reserved here as root), cudaHostRegister
  hugetlb-1g  the same from the 1 GiB pool, where the kernel can reserve one
Then, with torch's pinned memory, three probes of what sets the rate (--probes):
  window      a 64 GiB store, the rows drawn from the first 1/64 of each (request, head): 1 GiB
              touched in all (the span touched, not the span allocated)
  rotate      12 stores of one 128k layer's size (5.9 GB), gathered in turn as the runtime's 12
              offloaded layers are, against the same store gathered again and again
  programs    the 64 GiB store's gather over 8 / 32 / 64 / 132 programs
Prints the system's huge-page settings, then markdown tables; JSON to OUT/bench_host_pages.json.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from pathlib import Path

import torch

from bench_gather import GemmLoad, step_loads
from specontext_compiler.runtime.kernels import elastic_load as el
from specontext_compiler.targets_probe import time_ms

MAP_HUGETLB, MAP_HUGE_SHIFT = 0x40000, 26
BATCH, HEADS, DIM, WIDTH, OVERLAP = 11, 8, 128, 2065, 0.8


ROW_BYTES = 2 * DIM * 2          # one (token, head): K and V of head_dim bf16 values, adjacent


def positions_for(span_gib: float) -> int:
    """Positions per (request, head) that make a [B, H, S, 2D] store of span_gib GiB."""
    return int(span_gib * 2**30) // (BATCH * HEADS * ROW_BYTES)


def step_bytes(loads) -> int:
    """Bytes one gather of `loads` reads over PCIe."""
    return int(loads.count) * ROW_BYTES


def release_pinned() -> None:
    """Give PyTorch's cached pinned blocks back, so the next store's allocation is fresh memory."""
    getattr(torch._C, "_host_emptyCache", lambda: None)()


def read_sys(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def reserve_huge_pages(page_kib: int, count: int) -> int:
    """Ask the kernel for `count` huge pages of page_kib; returns how many it holds."""
    pool = Path(f"/sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages")
    try:
        pool.write_text(str(count))
        return int(pool.read_text())
    except OSError:
        return 0


class RegisteredMap(mmap.mmap):
    """An anonymous mapping registered with CUDA; unregistered before it is unmapped."""

    registered_ptr = None

    def __del__(self):
        if self.registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self.registered_ptr)
        self.close()


def mapped_host(nbytes: int, method: str) -> torch.Tensor:
    """A uint8 host tensor of nbytes from a registered mapping of the method's page kind."""
    nbytes = -(-nbytes // 2**30) * 2**30          # whole 1 GiB pages for every method
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if method == "hugetlb-2m":
        flags |= MAP_HUGETLB | (21 << MAP_HUGE_SHIFT)
    elif method == "hugetlb-1g":
        flags |= MAP_HUGETLB | (30 << MAP_HUGE_SHIFT)
    region = RegisteredMap(-1, nbytes, flags=flags)
    if method == "thp":
        region.madvise(mmap.MADV_HUGEPAGE)
    host = torch.frombuffer(region, dtype=torch.uint8)
    host.fill_(1)                                  # fault every page in before pinning it
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    region.registered_ptr = host.data_ptr()
    return host


def host_store(seq: int, method: str) -> torch.Tensor:
    """[B, H, seq, 2D] bf16 K-and-V history (the runtime's adjacent layout) in the method's memory."""
    shape = (BATCH, HEADS, seq, 2 * DIM)
    nbytes = BATCH * HEADS * seq * ROW_BYTES
    if method == "pinned":
        store = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        store.view(torch.uint8).view(-1).fill_(1)
        return store
    return mapped_host(nbytes, method)[:nbytes].view(torch.bfloat16).view(shape)


def thp_share() -> str:
    """AnonHugePages in /proc/meminfo: how much anonymous memory THP backs right now."""
    for line in read_sys("/proc/meminfo").splitlines():
        if line.startswith("AnonHugePages"):
            return line.split(":")[1].strip()
    return "?"


def measure(method: str, span_gib: float, repeats: int, gemms: GemmLoad) -> dict:
    seq = positions_for(span_gib)
    pool = {"hugetlb-2m": (2048, 512), "hugetlb-1g": (1048576, 1)}.get(method)
    if pool:     # reserved per run and given back after: both pools at once would not fit the host
        held = reserve_huge_pages(pool[0], (int(span_gib) + 1) * pool[1])
        if held < int(span_gib) * pool[1]:
            reserve_huge_pages(pool[0], 0)
            raise RuntimeError(f"the kernel reserved only {held} pages of {pool[0]} KiB")
    try:
        return _measure(method, seq, repeats, gemms)
    finally:
        if pool:
            reserve_huge_pages(pool[0], 0)


def _measure(method: str, seq: int, repeats: int, gemms: GemmLoad) -> dict:
    start = time.perf_counter()
    store = host_store(seq, method)
    alloc_s = time.perf_counter() - start
    host_k, host_v = store[..., :DIM], store[..., DIM:]
    device = torch.device("cuda")
    loads = step_loads(BATCH, HEADS, seq, WIDTH, OVERLAP, device)
    buf_k, buf_v = buffers(device)
    copy = lambda: el.gather_compact(host_k, host_v, buf_k, buf_v, loads, HEADS)   # noqa: E731
    copy()
    check = host_k[0, 0, loads.entries[1, 0].item()].to(device)
    assert torch.equal(buf_k[0, 0, loads.entries[2, 0].item()], check), "gather read the wrong row"
    nbytes = step_bytes(loads)
    alone, beside = time_ms(copy, repeats), gemms.beside(copy, repeats)
    row = {"method": method, "span_gib": store.numel() * 2 / 2**30, "alloc_s": alloc_s, "mb": nbytes / 1e6,
           "alone_ms": alone, "alone_gbps": nbytes / alone / 1e6, "beside_ms": beside,
           "beside_gbps": nbytes / beside / 1e6, "anon_huge": thp_share()}
    del store, host_k, host_v, copy
    release_pinned()
    return row


def pinned_store(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    store = host_store(seq, "pinned")
    return store[..., :DIM], store[..., DIM:]


def buffers(device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.zeros(BATCH, HEADS, WIDTH, DIM, device=device, dtype=torch.bfloat16) for _ in "kv")


def probe_window(repeats: int) -> list[dict]:
    """64 GiB allocated; rows from all of it, then from its first 1 GiB only."""
    device = torch.device("cuda")
    seq = positions_for(64)
    host_k, host_v = pinned_store(seq)
    buf_k, buf_v = buffers(device)
    rows = []
    for name, drawn_from in (("all 64 GiB", seq), ("first 1/64 of each (request, head)", seq // 64)):
        loads = step_loads(BATCH, HEADS, drawn_from, WIDTH, OVERLAP, device)
        ms = time_ms(lambda: el.gather_compact(host_k, host_v, buf_k, buf_v, loads, HEADS), repeats)
        rows.append({"probe": "window", "case": name, "ms": ms, "gbps": step_bytes(loads) / ms / 1e6})
    for programs in (8, 32, 64, 132):
        loads = step_loads(BATCH, HEADS, seq, WIDTH, OVERLAP, device)
        ms = time_ms(lambda: el.gather_compact(host_k, host_v, buf_k, buf_v, loads, HEADS, programs=programs),
                     repeats)
        rows.append({"probe": "programs", "case": f"{programs} programs, 64 GiB", "ms": ms,
                     "gbps": step_bytes(loads) / ms / 1e6})
    del host_k, host_v
    release_pinned()
    return rows


class Rotation:
    """The step's pattern: one gather per offloaded layer, each from its own store of one 128k
    layer's size (5.9 GB), all copying the same compact list (runtime/prefetch.py shares it)."""

    def __init__(self, layers: int = 12, seq: int = 130560):
        device = torch.device("cuda")
        self.stores = [pinned_store(seq) for _ in range(layers)]
        self.bufs = [buffers(device) for _ in range(layers)]
        self.loads = step_loads(BATCH, HEADS, seq, WIDTH, OVERLAP, device)

    def all_layers(self, **grid) -> None:
        for (hk, hv), (bk, bv) in zip(self.stores, self.bufs):
            el.gather_compact(hk, hv, bk, bv, self.loads, HEADS, **grid)

    def one_layer(self) -> None:
        for bk, bv in self.bufs:
            el.gather_compact(*self.stores[0], bk, bv, self.loads, HEADS)

    def close(self) -> None:
        self.stores = []
        release_pinned()


def probe_rotate(repeats: int) -> list[dict]:
    """12 stores gathered in turn, against one store gathered 12 times."""
    rotation, rows = Rotation(), []
    for name, fn in (("12 stores in turn", rotation.all_layers), ("one store 12 times", rotation.one_layer)):
        ms = time_ms(fn, repeats) / len(rotation.bufs)
        rows.append({"probe": "rotate", "case": name, "ms": ms, "gbps": step_bytes(rotation.loads) / ms / 1e6})
    rotation.close()
    return rows


def probe_blocks(repeats: int) -> list[dict]:
    """The 12-layer rotation over (programs, block rows, warps): alone, beside a decode-like loop,
    and that loop's slowdown beside the rotation."""
    from specontext_compiler.targets_probe import _beside, _DecodeLoop
    rotation, decode = Rotation(), _DecodeLoop(torch.device("cuda"))
    layers, nbytes = len(rotation.bufs), step_bytes(rotation.loads)
    decode_ms, rows = time_ms(decode), []
    for programs, block_rows, warps in ((8, 64, 4), (8, 128, 8), (8, 256, 8), (8, 256, 16), (8, 512, 16),
                                        (16, 64, 4), (16, 128, 8), (16, 256, 16), (32, 64, 4)):
        def grid_rotation():
            rotation.all_layers(programs=programs, block_rows=block_rows, num_warps=warps)
        alone = time_ms(grid_rotation, repeats) / layers
        beside = _beside(grid_rotation, decode, decode_ms, repeats) / layers
        slowed = _beside(decode, grid_rotation, alone * layers, repeats) / decode_ms
        rows.append({"probe": "blocks", "case": f"{programs} programs x {block_rows} rows, {warps} warps",
                     "ms": alone, "gbps": nbytes / alone / 1e6, "beside_gbps": nbytes / beside / 1e6,
                     "decode_slowdown": slowed})
        print(json.dumps(rows[-1]), flush=True)
    rotation.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans-gib", default="1,64")
    parser.add_argument("--methods", default="pinned,thp,hugetlb-2m,hugetlb-1g")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--probes", default="window,rotate", help="'' for none")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    spans = [float(s) for s in args.spans_gib.split(",")]
    system = {name: read_sys(path) for name, path in (
        ("thp_enabled", "/sys/kernel/mm/transparent_hugepage/enabled"),
        ("thp_defrag", "/sys/kernel/mm/transparent_hugepage/defrag"))}
    groups = "/sys/kernel/iommu_groups"
    system["iommu_groups"] = str(len(os.listdir(groups))) if os.path.isdir(groups) else "none"
    print(json.dumps(system))
    gemms, rows = GemmLoad(torch.device("cuda")), []
    for method in filter(None, args.methods.split(",")):
        for span in spans:
            try:
                rows.append(measure(method, span, args.repeats, gemms))
            except (RuntimeError, OSError, MemoryError) as exc:
                rows.append({"method": method, "span_gib": span, "error": str(exc).splitlines()[0][:120]})
            print(json.dumps(rows[-1]), flush=True)
    probes = []
    for probe in filter(None, args.probes.split(",")):
        probes += {"window": probe_window, "rotate": probe_rotate, "blocks": probe_blocks}[probe](args.repeats)
        print(json.dumps(probes[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_host_pages.json").write_text(json.dumps({"system": system, "rows": rows, "probes": probes},
                                                                  indent=1))
    print("\n| host memory | span GiB | alloc s | alone GB/s | beside GEMMs GB/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['span_gib']:.0f} | failed: {r['error']} | | |")
        else:
            print(f"| {r['method']} | {r['span_gib']:.1f} | {r['alloc_s']:.1f} | {r['alone_gbps']:.1f} | "
                  f"{r['beside_gbps']:.1f} |")
    print("\n| probe | case | ms per gather | GB/s | beside decode GB/s | decode slowdown |\n|---|---|---|---|---|---|")
    for p in probes:
        print(f"| {p['probe']} | {p['case']} | {p['ms']:.3f} | {p['gbps']:.1f} | {p.get('beside_gbps', 0):.1f} | "
              f"{p.get('decode_slowdown', 0):.3f} |")


if __name__ == "__main__":
    main()

"""GB/s of the kernels on the GPU against their byte models, timed as CUDA-graph replays.

Run on a GPU machine from the repo root: python -m tests.runtime.kernels.bench_kernels
"""
import torch
import triton.testing

from specontext_compiler.runtime.kernels import elastic_load as el
from specontext_compiler.runtime.kernels import sparse_decode as sd


def _gbps(nbytes, ms):
    return nbytes / ms / 1e6


def time_ms(fn):
    """GPU time of one call replayed from a CUDA graph (how the runtime runs it: no launch overhead)."""
    fn()
    return triton.testing.do_bench_cudagraph(fn)


def main():
    dev, bf16 = "cuda", torch.bfloat16
    for batch in (1, 8):
        heads, kv_heads, seq, width, dim = 32, 8, 32768, 2065, 128
        q = torch.randn(batch, heads, dim, device=dev, dtype=bf16)
        k = torch.randn(batch, kv_heads, seq, dim, device=dev, dtype=bf16)
        v = torch.randn_like(k)
        idx = torch.stack([torch.randperm(seq, device=dev)[:width].sort().values
                           for _ in range(batch * kv_heads)]).view(batch, kv_heads, width).int()
        kn, vn = k[:, :, 0].contiguous(), v[:, :, 0].contiguous()
        ms = time_ms(lambda: sd.sparse_decode(q, k, v, idx, kn, vn, 0.088))
        print(f"sparse_decode B={batch} Hq=32 Hkv=8 W={width} D=128 bf16: {ms * 1e3:.1f} us, "
              f"{_gbps(sd.sparse_decode_bytes(q, k, v, idx), ms):.0f} GB/s")
        host_k = torch.randn(batch, kv_heads, seq, dim, dtype=bf16).pin_memory()
        host_v = torch.randn_like(host_k).pin_memory()
        buf_k = torch.empty(batch, kv_heads, width, dim, device=dev, dtype=bf16)
        buf_v = torch.empty_like(buf_k)
        empty = torch.full_like(idx, -1)
        load_pos, load_slot, _ = el.elastic_diff(empty, idx)        # a cold buffer: every row loads
        ms = time_ms(lambda: el.gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot))
        nbytes = int(el.gather_rows_bytes(load_pos, 1, dim, dim, 2)) // 2   # bytes over PCIe (reads)
        print(f"gather_rows pinned->GPU B={batch} rows={batch * kv_heads * width} (K and V rows of 256 B): "
              f"{ms * 1e3:.1f} us, {_gbps(nbytes, ms):.1f} GB/s host reads")
        ms = time_ms(lambda: el.elastic_diff(empty, idx))
        print(f"elastic_diff B={batch} G=8 W={width}: {ms * 1e3:.1f} us")


if __name__ == "__main__":
    main()

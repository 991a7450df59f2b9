"""Where a chunked prefill's time goes on the GPU: history copies of offloaded layers, and attention.

    python benchmarks/measure_prefill_pieces.py

For one 256-token chunk of a request with 16k tokens of history (Llama-3.1-8B shape: 8 KV heads,
32 query heads, head dim 128, bf16): (1) bringing an offloaded layer's history from pinned host
memory to the GPU as one strided view (`.to`), or head by head (each head's span is contiguous);
(2) SDPA with a boolean mask and enable_gqa, or with causal_lower_right and expanded KV heads.
Prints a table of median milliseconds.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

HEADS, KV, D, CHUNK, HISTORY, MAX_LEN = 32, 8, 128, 256, 16384, 34816


def median_ms(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    host = torch.randn(1, KV, MAX_LEN, D, dtype=torch.bfloat16).pin_memory()
    end = HISTORY + CHUNK
    out = torch.empty(1, KV, end, D, dtype=torch.bfloat16, device="cuda")

    def strided():
        host[:, :, :end].to("cuda", non_blocking=True)

    def per_head():
        for h in range(KV):
            out[0, h].copy_(host[0, h, :end], non_blocking=True)

    q = torch.randn(1, HEADS, CHUNK, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, KV, end, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    mask = torch.arange(end, device="cuda").view(1, end) <= torch.arange(HISTORY, end, device="cuda").view(CHUNK, 1)

    def bool_mask_gqa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def lower_right_expanded():
        F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                       attn_mask=causal_lower_right(CHUNK, end))

    rows = [("history copy, strided .to()", median_ms(strided)),
            ("history copy, per head (contiguous spans)", median_ms(per_head)),
            ("SDPA bool mask + enable_gqa", median_ms(bool_mask_gqa)),
            ("SDPA causal_lower_right + expanded KV", median_ms(lower_right_expanded))]
    print(f"\none K (or V) history of {end} tokens = {host[:, :, :end].numel() * 2 / 1e6:.1f} MB; chunk {CHUNK}")
    print("| piece | median ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()

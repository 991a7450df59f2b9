"""Hugging Face baselines for bench_e2e.py: eager decoding with DynamicCache, and its offloaded cache.

The caches are filled with random K/V of the context length instead of running a prefill: a
decode step's time does not depend on the values, and a 128k prefill would cost minutes of the
benchmark's budget. The decode steps themselves are HF's own (model.forward with the cache).
"""
from __future__ import annotations

import time

import torch


def fill_dynamic_cache(config, batch: int, context: int, device, dtype, offloading: bool):
    """A DynamicCache holding `context` random tokens per layer for `batch` requests."""
    from transformers import DynamicCache
    cache = DynamicCache(offloading=offloading)
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
        cache.update(k, v, layer)
        del k, v
    return cache


def time_hf_decode(model, batch: int, context: int, steps: int, offloading: bool = False) -> dict:
    """Median step time of HF eager decoding at `context` tokens; {'oom': True} if it does not fit."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        cache = fill_dynamic_cache(model.config, batch, context, device, dtype, offloading)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        times = []
        with torch.inference_mode():
            for step in range(steps + 2):
                pos = torch.full((batch, 1), context + step, device=device)
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                if step >= 2:                    # two warm-up steps
                    times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "batch": batch}
    finally:
        cache = out = None
        torch.cuda.empty_cache()
    step_s = sorted(times)[len(times) // 2]
    return {"oom": False, "batch": batch, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9}


def largest_fitting_batch(model, context: int, steps: int, start_batch: int) -> dict:
    """HF eager's best batch at this context: the largest that runs, searched downwards."""
    for batch in range(start_batch, 0, -1):
        result = time_hf_decode(model, batch, context, steps)
        if not result["oom"]:
            return result
    return {"oom": True, "batch": 0}


def estimate_max_batch(model, context: int) -> int:
    """Upper bound for the search: free memory over one request's KV (plus one layer's copy)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    free, _ = torch.cuda.mem_get_info()
    return max(1, int(free // (per_token * context * (1 + 1 / cfg.num_hidden_layers))))

"""Dense causal attention over the KV store, for prefill (decode is sparse: runtime/kernels/).

Shapes: q [B, Hq, T, D]; k_new, v_new [B, Hkv, T, D]; caches [B, Hkv, N, D] (a view over the
request slots of this forward); starts: tokens already cached per request, a host list of B ints
(a device tensor would be read back at every layer).
Outputs are [B, T, Hq, Dv], the layout Hugging Face's attention interface returns.
"""
from __future__ import annotations

import torch


def dense_causal(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 starts: list[int], scaling: float, window: int = 0) -> torch.Tensor:
    """Causal attention of T new queries over each request's cache [0, start+T) (prefill).

    starts: cached length per request, read on the host. window > 0 (a sliding-window layer):
    query p sees keys (p - window, p] only, as HF's mask.
    """
    batch, num_heads, steps, _ = q.shape
    starts = [int(s) for s in starts]
    if q.is_cuda:
        return causal_sdpa(q, cache_k, cache_v, starts, scaling, window)
    group = num_heads // cache_k.shape[1]
    outs = []
    for b in range(batch):
        end = starts[b] + steps
        k = cache_k[b, :, :end].float().repeat_interleave(group, dim=0)
        v = cache_v[b, :, :end].float().repeat_interleave(group, dim=0)
        logits = torch.einsum("htd,hsd->hts", q[b].float(), k) * scaling
        query_pos = torch.arange(end - steps, end, device=q.device).view(steps, 1)
        key_pos = torch.arange(end, device=q.device).view(1, end)
        logits = logits.masked_fill(_hidden(key_pos, query_pos, window), float("-inf"))
        outs.append(torch.einsum("hts,hsd->thd", logits.softmax(-1), v))
    return torch.stack(outs).to(q.dtype)


def _hidden(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Keys a query may not see: later ones, and (window > 0) those window or more behind it."""
    later = key_pos > query_pos
    return later | (key_pos <= query_pos - window) if window else later


def causal_sdpa(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                starts: list[int], scaling: float, window: int = 0) -> torch.Tensor:
    """The same through PyTorch's fused SDPA (flash on the GPU: no [heads, T, S] logits in memory).

    Requests with equal starts (a batch of one, always, for the scheduler's prefill) share one call.
    A request's first chunk is plain causal attention (is_causal); a later chunk's queries sit at
    the end of the keys, which is the lower-right causal bias, mask-free for flash. A sliding
    window needs an explicit mask, and so does a later chunk in fp32 (flash takes half precision
    only, and the bias's fallback calls the memory-efficient kernel directly, which does not take
    GQA's fewer KV heads). With a mask, KV heads are expanded first: SDPA's memory-efficient kernel
    then takes it, where GQA with a mask would fall back to the math kernel's [Hq, T, S] scores."""
    batch, steps = q.shape[0], q.shape[2]
    if len(set(starts)) == 1:
        return _sdpa_rows(q, cache_k, cache_v, slice(0, batch), starts[0], steps, scaling, window).to(q.dtype)
    outs = [_sdpa_rows(q, cache_k, cache_v, slice(b, b + 1), starts[b], steps, scaling, window)
            for b in range(batch)]
    return torch.cat(outs).to(q.dtype)


def _sdpa_rows(q, cache_k, cache_v, rows: slice, start: int, steps: int, scaling: float, window: int):
    """[b, T, Hq, Dv] for the requests `rows`, which all have `start` tokens cached."""
    import torch.nn.functional as F
    end = start + steps
    q, k, v = q[rows], cache_k[rows, :, :end], cache_v[rows, :, :end]
    if start == 0 and not window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    elif not window and q.dtype in _FLASH_DTYPES:
        from torch.nn.attention.bias import causal_lower_right
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(steps, end),
                                             scale=scaling, enable_gqa=True)
    else:
        query_pos = torch.arange(start, end, device=q.device).view(steps, 1)
        mask = ~_hidden(torch.arange(end, device=q.device).view(1, end), query_pos, window)
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


_FLASH_DTYPES = (torch.float16, torch.bfloat16)

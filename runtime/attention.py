"""Attention over the KV store: append, dense causal (prefill), sparse decode (paper s.4.3, s.5).

Plain-PyTorch paths, used on CPU and as the fallback; on CUDA the step context swaps in the
Triton kernels of runtime/kernels/ (same signatures, compared against these in the tests).

Shapes: q [B, Hq, T, D]; k_new, v_new [B, Hkv, T, D]; caches [B, Hkv, N, D] (a view over the
request slots of this forward); starts [B] int64: tokens already cached per request.
Outputs are [B, T, Hq, Dv], the layout Hugging Face's attention interface returns.
"""
from __future__ import annotations

import torch


def append_reference(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, starts: torch.Tensor) -> None:
    """Write T new tokens per request at positions starts[b] .. starts[b]+T-1 (in place)."""
    batch, heads, steps, _ = k_new.shape
    if steps == 1:
        rows = torch.arange(batch, device=cache_k.device).view(batch, 1)
        head_ids = torch.arange(heads, device=cache_k.device).view(1, heads)
        pos = starts.to(cache_k.device).view(batch, 1)
        cache_k[rows, head_ids, pos] = k_new[:, :, 0].to(cache_k.dtype)
        cache_v[rows, head_ids, pos] = v_new[:, :, 0].to(cache_v.dtype)
        return
    for b in range(batch):
        start = int(starts[b])
        cache_k[b, :, start:start + steps].copy_(k_new[b])
        cache_v[b, :, start:start + steps].copy_(v_new[b])


def dense_causal(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 starts: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of T new queries over each request's cache [0, start+T) (prefill)."""
    batch, num_heads, steps, _ = q.shape
    if q.is_cuda:
        return _dense_causal_sdpa(q, cache_k, cache_v, starts, scaling)
    group = num_heads // cache_k.shape[1]
    outs = []
    for b in range(batch):
        end = int(starts[b]) + steps
        k = cache_k[b, :, :end].float().repeat_interleave(group, dim=0)
        v = cache_v[b, :, :end].float().repeat_interleave(group, dim=0)
        logits = torch.einsum("htd,hsd->hts", q[b].float(), k) * scaling
        query_pos = torch.arange(end - steps, end, device=q.device).view(steps, 1)
        key_pos = torch.arange(end, device=q.device).view(1, end)
        logits = logits.masked_fill(key_pos > query_pos, float("-inf"))
        outs.append(torch.einsum("hts,hsd->thd", logits.softmax(-1), v))
    return torch.stack(outs).to(q.dtype)


def _dense_causal_sdpa(q, cache_k, cache_v, starts, scaling):
    """The same on the GPU through PyTorch's fused SDPA (no [heads, T, S] logits in memory)."""
    import torch.nn.functional as F
    steps = q.shape[2]
    outs = []
    for b in range(q.shape[0]):
        end = int(starts[b]) + steps
        query_pos = torch.arange(end - steps, end, device=q.device).view(steps, 1)
        mask = torch.arange(end, device=q.device).view(1, end) <= query_pos
        out = F.scaled_dot_product_attention(q[b:b + 1], cache_k[b:b + 1, :, :end], cache_v[b:b + 1, :, :end],
                                             attn_mask=mask, scale=scaling, enable_gqa=True)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs).to(q.dtype)


def sparse_decode_reference(q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                            rows: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """One new query per request over selected rows of k_src/v_src plus the new token itself.

    q: [B, Hq, D]; k_src, v_src: [B, Hkv, N, D]; rows: [B, G, W] int (-1 = skip; G = Hkv or 1);
    k_new, v_new: [B, Hkv, D]. Returns [B, Hq, Dv].
    """
    batch, num_heads, dim = q.shape
    num_kv_heads = k_src.shape[1]
    group = num_heads // num_kv_heads
    rows = rows.long().expand(batch, num_kv_heads, rows.shape[-1])
    valid = rows >= 0
    safe = rows.clamp(min=0)
    k_sel = torch.gather(k_src, 2, safe.unsqueeze(-1).expand(-1, -1, -1, k_src.shape[-1])).float()
    v_sel = torch.gather(v_src, 2, safe.unsqueeze(-1).expand(-1, -1, -1, v_src.shape[-1])).float()
    k_all = torch.cat([k_sel, k_new.float().unsqueeze(2)], dim=2)        # [B, Hkv, W+1, D]
    v_all = torch.cat([v_sel, v_new.float().unsqueeze(2)], dim=2)
    mask = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)   # new token always attended
    qg = q.float().view(batch, num_kv_heads, group, dim)
    logits = torch.einsum("bhgd,bhwd->bhgw", qg, k_all) * scaling
    logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    out = torch.einsum("bhgw,bhwd->bhgd", logits.softmax(-1), v_all)
    return out.reshape(batch, num_heads, -1).to(q.dtype)

"""Dense causal attention over the KV store, for prefill (decode is sparse: runtime/kernels/).

Shapes: q [B, Hq, T, D]; k_new, v_new [B, Hkv, T, D]; caches [B, Hkv, N, D] (a view over the
request slots of this forward); starts [B] int64: tokens already cached per request.
Outputs are [B, T, Hq, Dv], the layout Hugging Face's attention interface returns.
"""
from __future__ import annotations

import torch


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
    """The same through PyTorch's SDPA, one request and one KV head (its query group) at a time.

    A boolean mask rules out the flash kernel; where SDPA falls back to its math path it holds
    [heads, T, S] fp32 logits. For all 32 query heads of a 256-token chunk over a 34k history that
    was 1.14 GiB, which ran the H100 out of memory in the [32k, 2k] workload (run 14); one KV
    head's group at a time bounds it at group/heads of that. The KV head is broadcast to its
    group as a view (stride 0), not copied.
    """
    import torch.nn.functional as F
    steps, num_kv_heads = q.shape[2], cache_k.shape[1]
    group = q.shape[1] // num_kv_heads
    outs = []
    for b in range(q.shape[0]):
        end = int(starts[b]) + steps
        query_pos = torch.arange(end - steps, end, device=q.device).view(steps, 1)
        mask = torch.arange(end, device=q.device).view(1, end) <= query_pos
        heads = []
        for h in range(num_kv_heads):
            k = cache_k[b:b + 1, h:h + 1, :end].expand(1, group, end, cache_k.shape[-1])
            v = cache_v[b:b + 1, h:h + 1, :end].expand(1, group, end, cache_v.shape[-1])
            heads.append(F.scaled_dot_product_attention(q[b:b + 1, h * group:(h + 1) * group], k, v,
                                                        attn_mask=mask, scale=scaling))
        outs.append(torch.cat(heads, dim=1).transpose(1, 2))
    return torch.cat(outs).to(q.dtype)

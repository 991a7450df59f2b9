"""Sparse decode inside a Hugging Face model: an attention function that applies the current method.

The eval registers `eval_attention` with transformers' AttentionInterface. A prefill (many query
tokens, empty cache) is dense and causal. A decode step (one query token) asks the active selector
for a keep-mask over the cached context at that layer and attends only to the kept tokens plus the
new one; the KV of all tokens stays in the cache (as the runtime's full KV store does), so a method
only changes what each step reads. A capture hook sees every layer's post-RoPE q and k (recall task).
Sliding-window layers (Gemma-3's local layers) attend over their window only and are never sparse.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from specontext_compiler.eval.methods import expand_to_heads

ATTN_NAME = "specontext_eval"
# selector(layer, query [B, Hq, D], context_keys [B, Hkv, S, D]) -> keep [B, G, S] or None (dense)
Selector = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
Capture = Callable[[int, torch.Tensor, torch.Tensor], None]


class _Active:
    selector: Selector | None = None
    capture: Capture | None = None


def eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
    layer = module.layer_idx
    if _Active.capture is not None:
        _Active.capture(layer, query, key)
    num_heads, num_kv = query.shape[1], key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    keep = None
    window = int(kwargs.get("sliding_window") or 0)
    if window and k_len > window:           # a local layer (Gemma-3): its window, never a selection
        return _windowed(query, key, value, window, scaling), None
    if q_len == 1 and _Active.selector is not None and k_len > 1:
        context_keep = _Active.selector(layer, query[:, :, 0], key[:, :, :-1])
        if context_keep is not None:
            new_token = torch.ones(*context_keep.shape[:2], 1, dtype=torch.bool, device=key.device)
            keep = expand_to_heads(torch.cat([context_keep, new_token], -1), num_heads)[:, :, None, :]
    assert q_len == 1 or q_len == k_len, "the eval prefills from an empty cache"
    # enable_gqa reads each KV head once for its query group instead of copying it per query head.
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=keep, is_causal=q_len > 1, scale=scaling, enable_gqa=num_kv != num_heads)
    return out.transpose(1, 2).contiguous(), None


def _windowed(query, key, value, window: int, scaling) -> torch.Tensor:
    """Causal attention where query position p sees keys (p - window, p] (HF's sliding mask)."""
    q_len, k_len = query.shape[2], key.shape[2]
    query_pos = torch.arange(k_len - q_len, k_len, device=key.device).view(q_len, 1)
    key_pos = torch.arange(k_len, device=key.device).view(1, k_len)
    mask = (key_pos <= query_pos) & (key_pos > query_pos - window)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()


def install(model) -> None:
    """Route the model's attention through eval_attention (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, eval_attention)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


@contextmanager
def active(selector: Selector | None = None, capture: Capture | None = None):
    """Use `selector` for decode steps and `capture` for every attention call inside the block."""
    previous = (_Active.selector, _Active.capture)
    _Active.selector, _Active.capture = selector, capture
    try:
        yield
    finally:
        _Active.selector, _Active.capture = previous

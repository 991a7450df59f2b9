"""A truncated copy of the LLM as the distilled model: "self-prefix:N" (eval only; paper s.4.1 stand-in).

The paper's retrieval head sits on a trained EAGLE-3 draft, whose single layer sees the target's
hidden states. None can be had offline, so this head is the next honest thing: the LLM's own first
N decoder layers, run in full (dense attention over the whole context, with their own KV cache),
produce the hidden state that enters layer N; layer N's input norm and Q/K projections (+ RoPE)
score the context from it. N = 0 is the plain "self:0" head (embedding -> layer 0's Q/K).

It is not small for large N: it holds the embedding, N whole decoder layers and one Q/K pair
(`param_report` says how many parameters and the reduction against the whole model). The
runtime's RetrievalHead cannot run decoder layers, so this head exists only in the eval.
"""
from __future__ import annotations

import torch

from specontext_compiler.eval import sparse_attention


class _PrefixCache:
    """The prefix layers' own K/V, duck-typed to the one call HF attention makes (`update`)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (a later decode run restarts after the context)."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][:, :, :length]
            self.values[layer] = self.values[layer][:, :, :length]


class PrefixHead:
    """The LLM's layers 0..N-1 (dense, own cache) + layer N's norm and Q/K: scores like RetrievalHead.

    model: an HF Llama-style causal LM (its layers are shared, not copied); num_layers: N >= 0.
    `project(ids, pos)` is stateful: positions continue the prefix cache, and a call that starts at
    an earlier position first crops the cache there (each eval method restarts after the context).
    """

    def __init__(self, model, num_layers: int):
        from specontext_compiler.dlm import extract_retrieval_head
        layers = model.model.layers
        if not 0 <= num_layers < len(layers):
            raise ValueError(f"prefix of {num_layers} layers: the model has {len(layers)}")
        self.model, self.num_layers = model, num_layers
        self.head, self.report = extract_retrieval_head(f"self:{num_layers}", model, llm=model)
        self.head.attach_embedding(model.model.embed_tokens.weight.detach())
        self.name = f"self-prefix:{num_layers}"
        self.cache = _PrefixCache()
        sparse_attention.install(model)    # its attention is causal for a prefill with mask=None

    @property
    def scaling(self) -> float:
        return self.head.scaling

    @property
    def selection_kv_heads(self) -> int:
        return self.head.selection_kv_heads

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] entering layer N, for ids / positions [B, T] continuing the cache."""
        start = int(position_ids[0, 0])
        if start < self.cache.length():
            self.cache.crop(start)
        assert start == self.cache.length(), "prefix positions must continue its cache"
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        if self.num_layers == 0:
            return hidden
        rotary = inner.rotary_emb(hidden, position_ids)
        with sparse_attention.active():      # dense: the prefix is the DLM, it sees everything
            for layer in inner.layers[: self.num_layers]:
                hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                               past_key_values=self.cache, use_cache=True, position_embeddings=rotary)
        return hidden

    def project(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                previous_features=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, T, D], k [B, Hkv, T, D] after RoPE (as RetrievalHead.project), through the prefix.

        previous_features is accepted for RetrievalHead's signature and unused: the head is not fused."""
        return self.head.project_hidden(self.hidden(input_ids, position_ids), position_ids)

    def param_report(self, total_params: int | None = None) -> dict:
        """Parameters of the prefix head (with / without the shared embedding) and the reductions."""
        layers = sum(p.numel() for layer in self.model.model.layers[: self.num_layers] for p in layer.parameters())
        qk = self.head.param_count(include_embedding=False)
        embedding = self.model.model.embed_tokens.weight.numel()
        total = total_params or sum({p.data_ptr(): p.numel() for p in self.model.parameters()}.values())
        without, with_embedding = layers + qk, layers + qk + embedding
        return {"head": self.name, "prefix_layers": self.num_layers, "params": without,
                "params_with_embedding": with_embedding, "model_params": total,
                "reduction": 1 - without / total, "reduction_with_embedding": 1 - with_embedding / total}


def make_head(model, name: str):
    """A head by name for the eval: "self:N" (layer N's Q/K on the embedding), "self-prefix:N", or
    a retrieval-head .safetensors file (e.g. one `specontext distill` trained; dlm.py checks that it
    fits the model and attaches the LLM's embedding)."""
    from specontext_compiler.dlm import extract_retrieval_head
    if name.startswith("self-prefix:"):
        return PrefixHead(model, int(name.split(":")[1]))
    head, _ = extract_retrieval_head(name, model, llm=model)
    return head

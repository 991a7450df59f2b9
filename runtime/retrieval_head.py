"""The lightweight retrieval head: what a DLM keeps to score context tokens (paper s.4.1, s.4.3).

From the distilled model only the tensors on the path to attention weights survive: the token
embedding (usually the LLM's own table, so it is shared, not copied), the RMSNorm before
attention, and one layer's Q and K projections with their RoPE. `project` turns tokens into
post-RoPE queries and keys; the runtime appends k to the head's own K cache and scores the newest
q against it (`selection.attention_weights` + `selection.select_tokens`, or the Triton kernels).

A fused head (EAGLE-3 style, as the paper's DLMs are) also reads the LLM's own hidden states:
row j's input is [norm(embedding(x_j)) ; fc(norm(F_{j-1}))], where F_{j-1} concatenates the LLM's
hidden states after `feature_layers` at the previous position (zeros at position 0). The previous
position's features exist before step j runs (the LLM computed them at step j-1), so selection
still happens up front, for all layers at once. Each feature block is RMS-normalized on its own
first: deep layers' hidden states are ~10x larger than shallow ones'.

RoPE supports the default, `linear`, `llama3` and `yarn` schedules: the paper stretches a 2k DLM
to long context with YaRN, and a head derived from Llama 3 keeps its llama3 scaling.

Imports only torch and the standard library: this file runs on the GPU machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from specontext_compiler.errors import ModelError

METADATA_KEY = "specontext_retrieval_head"
FORMAT_VERSION = 2        # 2: fused heads (feature_layers, fc_weight, feature_norm_weight)
_SHAPE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "norm_eps",
                 "rope", "max_position_embeddings", "embedding_shared", "embedding_name",
                 "selection_kv_heads", "source", "layer", "feature_layers")
_TENSORS = ("embedding", "norm_weight", "q_weight", "k_weight", "q_bias", "k_bias", "fc_weight",
            "feature_norm_weight", "q_norm_weight", "k_norm_weight")


# -- RoPE ---------------------------------------------------------------------------------------
def rope_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32) and the cos/sin scale (YaRN's attention factor)."""
    base = float(rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if kind == "default":
        return inv_freq.float(), 1.0
    factor = float(rope["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, rope).float(), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, factor, rope, max_position_embeddings)
    raise ModelError(f"RoPE type {kind!r} is not supported by the retrieval head; "
                     "use default, linear, llama3 or yarn")


def _llama3(inv_freq: torch.Tensor, factor: float, rope: dict) -> torch.Tensor:
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_len = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    # Between the two wavelengths, blend the scaled and unscaled frequencies.
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(head_dim: int, base: float, factor: float, rope: dict,
          max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = float(rope.get("original_max_position_embeddings") or max_position_embeddings)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    extrapolate = 1 - ramp      # high-frequency dimensions keep their original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq.float(), float(attention_factor)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Rotate x [B, H, T, D] by positions [B, T] (half-split layout, as HF Llama)."""
    angles = position_ids.to(torch.float32)[:, None, :, None] * inv_freq.to(x.device)[None, None, None, :]
    cos, sin = (torch.cat([angles.cos(), angles.cos()], -1) * scale,
                torch.cat([angles.sin(), angles.sin()], -1) * scale)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, computed in fp32 (no weight)."""
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# -- the head -----------------------------------------------------------------------------------
class RetrievalHead:
    """Embedding + RMSNorm + one layer's Q/K projections + RoPE: enough to score context tokens.

    Weights: embedding [V, H] (None until attached when shared with the LLM), norm_weight [H],
    q_weight [Hq*D, H], k_weight [Hkv*D, H], optional q_bias / k_bias. A fused head has
    feature_layers (F indices into the LLM's hidden states: 0 = embedding output, i = after
    decoder layer i-1), feature_norm_weight [F*H], fc_weight [H, F*H], and q/k weights [*, 2H].
    selection_kv_heads: the `num_kv_heads` to pass to `selection.select_tokens` so that index
    groups line up with the LLM's KV heads (the LLM's Hkv for GQA/MQA, its Hq for MHA/MLA).
    """

    def __init__(self, *, embedding, norm_weight, q_weight, k_weight, q_bias=None, k_bias=None,
                 num_heads: int, num_kv_heads: int, head_dim: int, norm_eps: float, rope: dict,
                 max_position_embeddings: int, embedding_shared: bool = False,
                 embedding_name: str = "model.embed_tokens.weight", selection_kv_heads: int | None = None,
                 vocab_size: int | None = None, source: str = "", layer: int = 0,
                 feature_layers=(), fc_weight=None, feature_norm_weight=None,
                 q_norm_weight=None, k_norm_weight=None, norm_offset: float = 0.0):
        self.embedding, self.norm_weight = embedding, norm_weight
        self.feature_layers = tuple(int(i) for i in feature_layers)
        self.fc_weight, self.feature_norm_weight = fc_weight, feature_norm_weight
        self.q_weight, self.k_weight, self.q_bias, self.k_bias = q_weight, k_weight, q_bias, k_bias
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.hidden_size = int(norm_weight.shape[0])
        self.vocab_size = int(vocab_size if vocab_size is not None else embedding.shape[0])
        self.norm_eps, self.rope, self.max_position_embeddings = float(norm_eps), dict(rope), max_position_embeddings
        # Gemma-style models: per-head RMSNorm of q and k before RoPE, and norms that scale by (1 + w)
        self.q_norm_weight, self.k_norm_weight, self.norm_offset = q_norm_weight, k_norm_weight, float(norm_offset)
        self.embedding_shared, self.embedding_name = embedding_shared, embedding_name
        self.selection_kv_heads = selection_kv_heads or num_kv_heads
        self.source, self.layer = source, layer
        assert q_weight.shape[0] == num_heads * head_dim and k_weight.shape[0] == num_kv_heads * head_dim
        fused_width = len(self.feature_layers) * self.hidden_size
        if self.feature_layers:
            assert fc_weight is not None and tuple(fc_weight.shape) == (self.hidden_size, fused_width)
            assert feature_norm_weight is not None and feature_norm_weight.shape[0] == fused_width
        assert q_weight.shape[1] == self.input_width and k_weight.shape[1] == self.input_width
        self._inv_freq, self._rope_scale = rope_inv_freq(self.rope, head_dim, max_position_embeddings)

    @property
    def scaling(self) -> float:
        """Softmax scale of the head's attention logits (1/sqrt(head_dim))."""
        return self.head_dim ** -0.5

    @property
    def fused(self) -> bool:
        """True when the head also reads the LLM's hidden states (EAGLE-3 style)."""
        return bool(self.feature_layers)

    @property
    def input_width(self) -> int:
        """Width of the Q/K projections' input: H, or 2H for a fused head."""
        return self.hidden_size * (2 if self.fused else 1)

    @property
    def feature_width(self) -> int:
        """Width of the LLM features a fused head reads per position (F*H; 0 if not fused)."""
        return len(self.feature_layers) * self.hidden_size

    def features_of(self, hidden_states) -> torch.Tensor:
        """[B, T, F*H] from the LLM's hidden states (HF's output_hidden_states tuple or a dict by index)."""
        return torch.cat([hidden_states[i] for i in self.feature_layers], dim=-1)

    def set_rope(self, rope: dict) -> "RetrievalHead":
        """Replace the RoPE schedule (e.g. add YaRN to stretch a short DLM); returns self."""
        self._inv_freq, self._rope_scale = rope_inv_freq(rope, self.head_dim, self.max_position_embeddings)
        self.rope = dict(rope)
        return self

    def attach_embedding(self, embedding: torch.Tensor) -> "RetrievalHead":
        """Use the LLM's embedding table [V, H] (shared, not copied)."""
        if tuple(embedding.shape) != (self.vocab_size, self.hidden_size):
            raise ModelError(f"embedding is {tuple(embedding.shape)}, the retrieval head needs "
                             f"({self.vocab_size}, {self.hidden_size}); pass the LLM it was extracted for")
        self.embedding = embedding
        return self

    @torch.no_grad()
    def project(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                previous_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, T, D], k [B, Hkv, T, D] after RoPE, for input_ids / position_ids [B, T].

        previous_features [B, T, F*H] (fused heads only): row j holds the LLM's features at
        position j-1 (`shift_features` builds it); None means zeros (no history yet).
        """
        if self.embedding is None:
            raise ModelError("the retrieval head shares the LLM's embedding and none is attached; "
                             "pass embedding= to RetrievalHead.load or call attach_embedding")
        return self.project_hidden(self.embedding[input_ids.to(self.embedding.device)], position_ids,
                                   previous_features)

    @torch.no_grad()
    def project_hidden(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                       previous_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, T, D], k [B, Hkv, T, D] after RoPE, from hidden states [B, T, H] instead of tokens.

        `project` feeds the embedding; a head that sits behind some decoder layers (a DLM's own
        layers, or a truncated copy of the LLM) feeds the hidden state those layers produce.
        """
        return self.qk_from_input(self.projection_input(hidden, previous_features), position_ids)

    def qk_from_input(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE q, k from the projections' input x [B, T, H or 2H] (differentiable)."""
        batch, tokens = x.shape[:2]
        q = torch.nn.functional.linear(x, self.q_weight, self.q_bias)
        k = torch.nn.functional.linear(x, self.k_weight, self.k_bias)
        q = q.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm_weight is not None:
            q = _rms_norm(q, self.norm_eps) * (self.norm_offset + self.q_norm_weight)
            k = _rms_norm(k, self.norm_eps) * (self.norm_offset + self.k_norm_weight)
        pos = position_ids.to(q.device)
        return apply_rope(q, pos, self._inv_freq, self._rope_scale), apply_rope(k, pos, self._inv_freq, self._rope_scale)

    def projection_input(self, hidden: torch.Tensor, previous_features: torch.Tensor | None = None) -> torch.Tensor:
        """The Q/K projections' input [B, T, H or 2H] (differentiable: the distiller trains through it)."""
        x = _rms_norm(hidden.to(self.q_weight.dtype), self.norm_eps) * (self.norm_offset + self.norm_weight)
        if not self.fused:
            return x
        if previous_features is None:
            previous_features = x.new_zeros(*x.shape[:2], self.feature_width)
        blocks = previous_features.to(x.dtype).unflatten(-1, (len(self.feature_layers), self.hidden_size))
        features = _rms_norm(blocks, self.norm_eps).flatten(-2) * self.feature_norm_weight
        return torch.cat([x, torch.nn.functional.linear(features, self.fc_weight)], dim=-1)

    @staticmethod
    def shift_features(features: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Row j gets features[j-1]: [B, T, F*H] -> [B, T, F*H]; row 0 gets `before` [B, F*H] or zeros.

        features are the LLM's at positions p..p+T-1; `before` its features at p-1 (None at p = 0).
        """
        first = features[:, :1] * 0 if before is None else before[:, None].to(features.dtype)
        return torch.cat([first, features[:, :-1]], dim=1)

    def param_count(self, include_embedding: bool | None = None) -> int:
        """Parameters the head holds; a shared embedding is excluded unless include_embedding=True."""
        if include_embedding is None:
            include_embedding = not self.embedding_shared
        names = [n for n in _TENSORS if n != "embedding"]
        count = sum(getattr(self, n).numel() for n in names if getattr(self, n) is not None)
        return count + (self.vocab_size * self.hidden_size if include_embedding else 0)

    def to(self, device=None, dtype=None) -> "RetrievalHead":
        """Move (and cast floating) weights in place; returns self."""
        for name in _TENSORS:
            tensor = getattr(self, name)
            if tensor is not None and not (name == "embedding" and self.embedding_shared):
                setattr(self, name, tensor.to(device=device, dtype=dtype))
        if device is not None:   # RoPE frequencies stay fp32 but must live beside the weights
            self._inv_freq = self._inv_freq.to(device)
        return self

    def _metadata(self) -> dict:
        extra = {"norm_offset": self.norm_offset} if self.norm_offset else {}     # older readers lack it
        return {name: getattr(self, name) for name in _SHAPE_FIELDS} | extra | {"format_version": FORMAT_VERSION}

    def to_bytes(self) -> bytes:
        """The safetensors file `save` writes, in memory; a shared embedding is recorded by name, not stored."""
        from safetensors.torch import save
        tensors = {n: getattr(self, n).contiguous() for n in _TENSORS
                   if getattr(self, n) is not None and not (n == "embedding" and self.embedding_shared)}
        return save(tensors, metadata={METADATA_KEY: json.dumps(self._metadata())})

    def save(self, path: str | Path) -> Path:
        """Write the head as a safetensors file (`load` reads it)."""
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    @staticmethod
    def is_head_file(path: str | Path) -> bool:
        """True for a safetensors file that `save` wrote (it carries our metadata key)."""
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                return METADATA_KEY in (handle.metadata() or {})
        except Exception:                  # not safetensors at all (any parser error): not ours
            return False

    @classmethod
    def load(cls, path: str | Path, embedding: torch.Tensor | None = None, device="cpu",
             dtype: torch.dtype | None = None) -> "RetrievalHead":
        """Read a head written by `save`; `embedding` [V, H] supplies a shared table."""
        from safetensors import safe_open
        if not Path(path).is_file():
            raise ModelError(f"retrieval head file {path} does not exist; extract one with "
                             "specontext_compiler.dlm.extract_retrieval_head")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta_text = (handle.metadata() or {}).get(METADATA_KEY)
            if meta_text is None:
                raise ModelError(f"{path} is not a specontext retrieval head (no {METADATA_KEY} metadata)")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = json.loads(meta_text)
        meta.pop("hidden_size", None)      # implied by norm_weight
        if meta.pop("format_version", 0) > FORMAT_VERSION:
            raise ModelError(f"{path} was written by a newer specontext; upgrade to read it")
        head = cls(embedding=tensors.get("embedding"), norm_weight=tensors["norm_weight"],
                   q_weight=tensors["q_weight"], k_weight=tensors["k_weight"],
                   q_bias=tensors.get("q_bias"), k_bias=tensors.get("k_bias"), fc_weight=tensors.get("fc_weight"),
                   feature_norm_weight=tensors.get("feature_norm_weight"), q_norm_weight=tensors.get("q_norm_weight"),
                   k_norm_weight=tensors.get("k_norm_weight"), **meta)
        head.to(device=device, dtype=dtype)
        if embedding is not None:
            head.attach_embedding(embedding)
        return head

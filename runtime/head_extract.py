"""Build a retrieval head from a model's tensors: the part of head extraction that bind needs.

The runtime derives the default head from the bound LLM itself (its embedding and one layer's
input norm and Q/K projections), and checks a saved head file against the LLM; both need the
LLM's geometry and the selection-group rules below. Reading draft checkpoints, GGUF files and
tokenizers stays on the compiler side (specontext_compiler.dlm), which builds on this module.

Selection is made per group of the LLM (selection.py): per KV head for GQA, per head for MHA and
MLA, one group for MQA or at batch level. A head's KV heads must map onto those groups.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from specontext_compiler.errors import ModelError, SpecontextError
from specontext_compiler.runtime.model_spec import attention_kind
from specontext_compiler.runtime.retrieval_head import RetrievalHead

EMBED = "model.embed_tokens.weight"
LAYER = "model.layers.{layer}."
EAGLE3_LAYER = "midlayer."


LEVELS = ("head", "batch")


def check_level(level: str) -> str:
    """The selection level, or a one-line error naming the choices."""
    if level not in LEVELS:
        raise SpecontextError(f"--level {level!r} is not a selection level; choose head or batch")
    return level


def llm_groups(geometry: dict, level: str) -> int:
    """G: independent index sets per request for an LLM of this geometry (see selection.py)."""
    if level == "batch" or geometry["kind"] == "mqa":
        return 1
    return geometry["num_heads"] if geometry["kind"] in ("mha", "mla") else geometry["num_kv_heads"]


def check_groups(head_heads: int, head_kv_heads: int, geometry: dict, level: str, who: str = "the DLM") -> int:
    """The LLM's group count G if the head's KV heads map onto it, else a one-line error."""
    groups = llm_groups(geometry, check_level(level))
    if groups == 1 or (head_kv_heads % groups == 0 and head_heads % groups == 0):
        return groups
    raise ModelError(
        f"{who} has {head_kv_heads} KV heads ({head_heads} query heads), the LLM selects for {groups} "
        f"KV-head groups ({geometry['num_heads']} query / {geometry['num_kv_heads']} KV heads): head-level "
        f"selection cannot map {head_kv_heads} onto {groups}; pass --level batch (level='batch', one shared "
        f"index set) or a DLM whose KV heads are a multiple of {groups}")



# -- LLM geometry -------------------------------------------------------------------------------
def llm_geometry(llm: Any) -> dict:
    """num_heads, num_kv_heads, kind (mha/gqa/mqa/mla), max_positions, hidden_size, vocab_size, num_layers.

    Of the LLM given as a ModelSpec, a config (object or dict), a model or a directory.
    """
    if hasattr(llm, "attention_kind"):                                 # ModelSpec
        return {"num_heads": llm.num_heads, "num_kv_heads": llm.num_kv_heads,
                "kind": llm.attention_kind, "max_positions": llm.max_positions,
                "hidden_size": llm.hidden_size, "vocab_size": llm.vocab_size, "num_layers": llm.num_layers}
    config = config_dict(llm)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    kind = attention_kind(heads, kv, latent=bool(config.get("kv_lora_rank")))
    return {"num_heads": heads, "num_kv_heads": kv, "kind": kind,
            "max_positions": int(config.get("max_position_embeddings", 2048)),
            "hidden_size": config.get("hidden_size"), "vocab_size": config.get("vocab_size"),
            "num_layers": config.get("num_hidden_layers")}


def config_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj) / "config.json"
        if not path.is_file():
            raise ModelError(f"{obj} has no config.json; pass an HF model directory")
        return json.loads(path.read_text())
    config = getattr(obj, "config", obj)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ModelError(f"cannot read a model configuration from {type(obj).__name__}; "
                     "pass a ModelSpec, an HF config, an HF model or a directory")


# -- tensor access ------------------------------------------------------------------------------
class Tensors:
    """Names, shapes and lazy reads of a checkpoint's tensors (directory or in-memory model)."""

    def __init__(self, source: Any):
        self._state, self._files = None, {}
        if isinstance(source, torch.nn.Module):
            self._state = dict(source.state_dict())
            seen = {p.data_ptr(): p.numel() for p in source.parameters()}
            self.total_params = sum(seen.values())
            return
        directory = Path(source)
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            from safetensors import safe_open
            for shard in shards:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in handle.keys():
                        self._files[name] = (shard, handle.get_slice(name).get_shape())
        else:
            bins = sorted(directory.glob("*.bin"))
            if not bins:
                raise ModelError(f"{directory} holds no .safetensors or .bin weights; pass a checkpoint directory")
            self._state = {}
            for path in bins:
                self._state.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        self.total_params = (sum(t.numel() for t in self._state.values()) if self._state is not None
                             else sum(_numel(shape) for _, shape in self._files.values()))

    def names(self) -> set[str]:
        return set(self._state) if self._state is not None else set(self._files)

    def get(self, name: str) -> torch.Tensor:
        if name == EMBED and name not in self.names() and "lm_head.weight" in self.names():
            name = "lm_head.weight"     # tied checkpoints may store the table only once, as the LM head
        if self._state is not None:
            return self._state[name].detach().clone()
        from safetensors import safe_open
        with safe_open(str(self._files[name][0]), framework="pt") as handle:
            return handle.get_tensor(name)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def rope_of(config: dict, layer: int = 0) -> dict:
    """Normalized RoPE dict (rope_type, rope_theta, scaling fields) from transformers 4.x or 5.x configs.

    Models with one RoPE per layer type (Gemma-3: local and global layers) get `layer`'s.
    """
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    types = config.get("layer_types") or []
    kind = types[layer] if layer < len(types) else "full_attention"
    params, scaling = _for_layer_type(params, kind), _for_layer_type(scaling, kind)
    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta") or 10000.0)} | params | scaling
    if "type" in rope and rope.get("rope_type", "default") == "default":
        rope["rope_type"] = rope.pop("type")
    return rope


def _for_layer_type(part: dict, kind: str) -> dict:
    """{"sliding_attention": {...}, "full_attention": {...}} -> the one for `kind`; flat dicts as they are."""
    if "full_attention" in part or "sliding_attention" in part:
        return dict(part.get(kind) or part.get("full_attention") or {})
    return part


def head_from(tensors: Tensors, config: dict, prefix: str, *, eagle3: bool, embedding, embedding_name: str,
               source: str, layer: int) -> RetrievalHead:
    names = tensors.names()
    q_name = prefix + "self_attn.q_proj.weight"
    if q_name not in names:
        raise ModelError(f"{source} has no {q_name}; it is not a Llama-style decoder (q_proj/k_proj) "
                         f"or layer {layer} does not exist")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    q_w, k_w = tensors.get(q_name), tensors.get(prefix + "self_attn.k_proj.weight")
    if eagle3:          # columns [0, hidden) act on the normed embedding; the rest on fc(hidden states)
        q_w, k_w = q_w[:, :hidden].contiguous(), k_w[:, :hidden].contiguous()
    bias = {n: tensors.get(prefix + f"self_attn.{n[0]}_proj.bias") for n in ("q_bias", "k_bias")
            if prefix + f"self_attn.{n[0]}_proj.bias" in names}
    bias |= {f"{n}_norm_weight": tensors.get(prefix + f"self_attn.{n}_norm.weight") for n in ("q", "k")
             if prefix + f"self_attn.{n}_norm.weight" in names}          # Gemma-3, Qwen3
    return RetrievalHead(
        embedding=embedding, norm_weight=tensors.get(prefix + "input_layernorm.weight"),
        q_weight=q_w, k_weight=k_w, **bias, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope=rope_of(config, layer),
        norm_offset=1.0 if str(config.get("model_type", "")).startswith("gemma") else 0.0,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        embedding_shared=embedding is None,
        embedding_name=embedding_name, vocab_size=int(config["vocab_size"] if embedding is None else embedding.shape[0]), source=source, layer=layer)


def embedding_name(names: set[str], config: dict) -> str | None:
    """The draft's token table: its embedding, or its LM head when the two are tied."""
    for name in (EMBED, "embed_tokens.weight"):
        if name in names:
            return name
    return "lm_head.weight" if config.get("tie_word_embeddings") and "lm_head.weight" in names else None


def fit_vocabulary(embedding: torch.Tensor, geometry: dict) -> torch.Tensor:
    """A draft's table padded with zero rows up to the LLM's vocabulary (same tokenizer, smaller
    padding): the LLM may emit a padding id, which must index a row."""
    rows = int(geometry.get("vocab_size") or 0)
    if rows <= embedding.shape[0]:
        return embedding
    return torch.cat([embedding, embedding.new_zeros(rows - embedding.shape[0], embedding.shape[1])])


def check_head_file(head: RetrievalHead, geometry: dict, path: Any) -> None:
    """A head file reads the LLM's tokens (and hidden states, if fused): its sizes must be the LLM's."""
    wanted = {"vocab_size": geometry.get("vocab_size")}
    if head.embedding_shared or head.fused:
        wanted["hidden_size"] = geometry.get("hidden_size")
    for name, llm_value in wanted.items():
        if llm_value is not None and getattr(head, name) != int(llm_value):
            raise ModelError(f"retrieval head {Path(path).name} has {name} {getattr(head, name)}, the LLM "
                             f"{llm_value}: it was made for another model")
    layers = geometry.get("num_layers")
    beyond = [i for i in head.feature_layers if layers is not None and not 0 <= i < int(layers)]
    if beyond:
        raise ModelError(f"retrieval head {Path(path).name} reads hidden states entering layers {beyond}, "
                         f"the LLM has layers 0..{int(layers) - 1}: it was made for another model")


def draft_head(tensors: Tensors, config: dict, geometry: dict, layer: int | None,
               source: str) -> tuple[RetrievalHead, bool]:
    """(head, is EAGLE-3) of a draft model or of the LLM itself: its token table (padded to the
    LLM's vocabulary) and layer `layer`'s input norm and Q/K projections (EAGLE-3: its midlayer)."""
    eagle3 = EAGLE3_LAYER + "self_attn.q_proj.weight" in tensors.names()
    prefix = EAGLE3_LAYER if eagle3 else LAYER.format(layer=layer or 0)
    embed_name = embedding_name(tensors.names(), config)
    embedding = fit_vocabulary(tensors.get(embed_name), geometry) if embed_name else None
    head = head_from(tensors, config, prefix, eagle3=eagle3, embedding=embedding,
                     embedding_name=embed_name or EMBED, source=source, layer=0 if eagle3 else (layer or 0))
    return head, eagle3


def fit_to_llm(head: RetrievalHead, geometry: dict, level: str) -> RetrievalHead:
    """The head, checked to map onto the LLM's selection groups and told how many there are."""
    check_groups(head.num_heads, head.num_kv_heads, geometry, level, who=head_owner(head))
    head.selection_kv_heads = llm_groups(geometry, level)
    return head


def head_from_model(model: torch.nn.Module, geometry: dict, layer: int | None, level: str) -> RetrievalHead:
    """The head of an HF model in memory; bind's default passes the LLM itself (no DLM needed)."""
    config = config_dict(model)
    check_draft(config, geometry, level, dlm=model)
    head, _ = draft_head(Tensors(model), config, geometry, layer, source="hf-model")
    return fit_to_llm(head, geometry, level)


def head_owner(head: RetrievalHead) -> str:
    """How an error names the head: the retrieval head (self-derived or distilled) or its DLM."""
    return "the retrieval head" if head.source.startswith(("self", "distilled")) else f"the DLM {Path(head.source).name}"


def check_draft(config: dict, geometry: dict, level: str, *, dlm: Any, llm_source: Any = None) -> list[str]:
    """Refuse a draft whose groups or vocabulary cannot serve the LLM; notes on what was accepted."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    check_groups(heads, kv, geometry, level, who=f"the DLM {Path(str(dlm)).name}")
    notes = []
    if kv != heads or geometry["num_heads"] != heads:
        notes.append(f"draft with {heads} query / {kv} KV heads selects for the LLM's "
                     f"{llm_groups(geometry, level)} group(s)")
    return notes + check_vocabulary(int(config["vocab_size"]), geometry.get("vocab_size"), dlm, llm_source)


def check_vocabulary(dlm_vocab: int, llm_vocab: int | None, dlm: Any, llm_source: Any) -> list[str]:
    """Same vocabulary size, or the same tokenizer under differently padded tables."""
    if llm_vocab is None or dlm_vocab == int(llm_vocab):
        return []
    same = _same_tokenizer(dlm, llm_source)
    if same:
        return [f"vocabulary tables differ ({dlm_vocab} vs {llm_vocab} rows) but the tokenizers agree"]
    why = "their tokenizers differ" if same is False else "no tokenizer to compare"
    raise ModelError(f"the DLM's vocabulary has {dlm_vocab} tokens, the LLM's {llm_vocab} ({why}): a draft "
                     "must share the LLM's tokenizer; pass a smaller model of the same family as --dlm")


def _same_tokenizer(dlm: Any, llm_source: Any) -> bool | None:
    """True / False when both tokenizers load and do / do not agree; None when one cannot load."""
    first, second = _tokenizer(dlm), _tokenizer(llm_source)
    if first is None or second is None:
        return None
    return first.get_vocab() == second.get_vocab()


def _tokenizer(source: Any):
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer
        path = Path(str(source))
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path)) if path.is_dir() else None
    except (OSError, ValueError, TypeError, ImportError):
        return None

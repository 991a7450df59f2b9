"""Extract the retrieval head from a distilled model (DLM) or from the LLM itself (paper s.4.1, s.4.3).

Sources: a local HF directory (safetensors or .bin, read lazily: only the kept tensors load), a GGUF
file (dequantized once through smollm2.load_causal_lm), an HF model in memory, "self" / "self:N"
(the LLM's own embedding + layer N's input norm and Q/K projections: an honest stand-in when no
DLM is available), or a RetrievalHead .safetensors file (`RetrievalHead.save`; the only source of
fused heads, which also read the LLM's hidden states: its size and layers are checked here).

Head-level selection is per group of the LLM (its KV heads for GQA): the head's KV heads must
map onto those groups (dlm_geometry.py), whatever its query heads; a separate draft model (its own
embedding, width and layers) is checked from its config before its weights load. level="batch"
(one shared index set) works for any geometry.

EAGLE-3 drafts (the paper's DLMs) feed q_proj/k_proj [embedding; fc(3 target hidden states)]
(2*hidden wide). Without the target's hidden states at selection time we keep only the columns that
act on the normalized embedding: an approximation, flagged in the report.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from specontext_compiler.dlm_geometry import check_draft, check_groups, check_level, dlm_config, llm_groups
from specontext_compiler.errors import ModelError
from specontext_compiler.head_info import NOT_MEASURED, head_file_facts, head_kind
from specontext_compiler.runtime.retrieval_head import RetrievalHead

EMBED = "model.embed_tokens.weight"
LAYER = "model.layers.{layer}."
EAGLE3_LAYER = "midlayer."
HEAD_FILE_SUFFIX = ".safetensors"


# -- LLM geometry -------------------------------------------------------------------------------
def llm_geometry(llm: Any) -> dict:
    """num_heads, num_kv_heads, kind (mha/gqa/mqa/mla), max_positions, hidden_size, vocab_size, num_layers.

    Of the LLM given as a ModelSpec, a config (object or dict), a model or a directory.
    """
    if hasattr(llm, "attention_kind"):                                 # ModelSpec
        return {"num_heads": llm.num_heads, "num_kv_heads": llm.num_kv_heads,
                "kind": llm.attention_kind, "max_positions": llm.max_positions,
                "hidden_size": llm.hidden_size, "vocab_size": llm.vocab_size, "num_layers": llm.num_layers}
    config = _config_dict(llm)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    kind = "mla" if config.get("kv_lora_rank") else "mha" if kv == heads else "mqa" if kv == 1 else "gqa"
    return {"num_heads": heads, "num_kv_heads": kv, "kind": kind,
            "max_positions": int(config.get("max_position_embeddings", 2048)),
            "hidden_size": config.get("hidden_size"), "vocab_size": config.get("vocab_size"),
            "num_layers": config.get("num_hidden_layers")}


def _config_dict(obj: Any) -> dict:
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


def selection_kv_heads(geometry: dict, level: str = "head") -> int:
    """`num_kv_heads` for selection.select_tokens: the LLM's selection groups at this level."""
    return llm_groups(geometry, level)


# -- tensor access ------------------------------------------------------------------------------
class _Tensors:
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


# -- extraction ---------------------------------------------------------------------------------
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


def _head_from(tensors: _Tensors, config: dict, prefix: str, *, eagle3: bool, embedding, embedding_name: str,
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


def _open(obj: Any) -> tuple[_Tensors, dict, str]:
    """(tensors, config dict, kind) for a directory, a GGUF file or an in-memory HF model."""
    if isinstance(obj, torch.nn.Module):
        return _Tensors(obj), _config_dict(obj), "hf-model"
    path = Path(obj)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()):
        from specontext_compiler.smollm2 import load_causal_lm
        _, _, directory = load_causal_lm(path)
        return _Tensors(directory), _config_dict(directory), "gguf"
    if not path.is_dir():
        raise ModelError(f"DLM {obj!r} is not a directory, a .gguf file, an HF model or 'self[:N]'")
    return _Tensors(path), _config_dict(path), "hf-directory"


def extract_retrieval_head(dlm: Any, llm_spec_or_config: Any, layer: int | None = None, *,
                           llm: Any = None, level: str = "head", extend_to: int | None = None,
                           llm_source: Any = None) -> tuple[RetrievalHead, dict]:
    """(RetrievalHead, report) from a DLM, a head file, or the LLM itself with dlm="self" / "self:N".

    llm_spec_or_config: the LLM's ModelSpec / HF config / HF model / directory (its geometry).
    llm: the LLM's weights (HF model or directory) for "self" heads and for a shared embedding;
         defaults to llm_spec_or_config when that is a model or a directory.
    extend_to: positions the head must cover; a DLM trained shorter gets YaRN (paper s.4.1).
    llm_source: the LLM's directory or GGUF, to compare a draft's tokenizer with (default: llm).
    level: "head" (per selection group) or "batch"; a draft must map onto the LLM's groups.
    """
    geometry = llm_geometry(llm_spec_or_config)
    check_level(level)
    weights_src = llm if llm is not None else (
        llm_spec_or_config if isinstance(llm_spec_or_config, (torch.nn.Module, str, os.PathLike)) else None)
    if isinstance(dlm, str) and (dlm == "self" or dlm.startswith("self:")):
        head, kind, dlm_params, notes = _self_head(dlm, layer, weights_src, geometry)
    elif is_head_file(dlm):
        head, kind, dlm_params, notes = _file_head(dlm, geometry)
    else:
        head, kind, dlm_params, notes = _dlm_head(dlm, layer, geometry, level, llm_source=llm_source or weights_src)
    if head.embedding is None and weights_src is not None:
        llm_tensors = _open(weights_src)[0]
        head.attach_embedding(llm_tensors.get(EMBED))
    check_groups(head.num_heads, head.num_kv_heads, geometry, level, who=_who(head))
    head.selection_kv_heads = selection_kv_heads(geometry, level)
    if extend_to and extend_to > head.max_position_embeddings and head.rope.get("rope_type") == "default":
        factor = extend_to / head.max_position_embeddings
        head.set_rope(head.rope | {"rope_type": "yarn", "factor": factor,
                                   "original_max_position_embeddings": head.max_position_embeddings})
        notes.append(f"RoPE extended with YaRN x{factor:g} to {extend_to} positions")
    facts = head_file_facts(dlm) if kind == "head-file" else {"recall": None, "recall_note": NOT_MEASURED}
    return head, {"teacher_layers": None, **_report(head, dlm_params, kind, level, geometry, notes), **facts}


def is_head_file(dlm: Any) -> bool:
    """True for a path to a RetrievalHead .safetensors file (as `RetrievalHead.save` writes)."""
    return isinstance(dlm, (str, os.PathLike)) and Path(dlm).suffix == HEAD_FILE_SUFFIX


def _self_head(dlm: str, layer: int | None, weights_src: Any, geometry: dict):
    """The LLM's own embedding + layer N's input norm and Q/K projections."""
    if weights_src is None:
        raise ModelError("a 'self' retrieval head needs the LLM's weights; pass llm= (an HF model or directory)")
    if geometry["kind"] == "mla":
        raise ModelError("a 'self' head cannot be derived from an MLA model (no plain q/k projections); "
                         "pass a distilled model as the DLM")
    layer = int(dlm.split(":")[1]) if ":" in dlm else (layer or 0)
    tensors, config, _ = _open(weights_src)
    head = _head_from(tensors, config, LAYER.format(layer=layer), eagle3=False, embedding=None,
                      embedding_name=EMBED, source=f"self:{layer}", layer=layer)
    notes = [f"self-derived: the LLM's embedding + layer {layer}'s input norm and Q/K projections"]
    return head, "self", tensors.total_params, notes


def _dlm_head(dlm: Any, layer: int | None, geometry: dict, level: str, llm_source: Any = None):
    """The head of a draft model (its own embedding, norm, Q/K): a directory, a GGUF file or an HF model.

    Its config is checked against the LLM (groups, vocabulary) before any weight loads.
    """
    config = dlm_config(dlm)
    notes = check_draft(config, geometry, level, dlm=dlm, llm_source=llm_source) if config else []
    tensors, config, kind = _open(dlm)
    eagle3 = EAGLE3_LAYER + "self_attn.q_proj.weight" in tensors.names()
    prefix = EAGLE3_LAYER if eagle3 else LAYER.format(layer=layer or 0)
    embed_name = _embedding_name(tensors.names(), config)
    embedding = _fit_vocabulary(tensors.get(embed_name), geometry) if embed_name else None
    head = _head_from(tensors, config, prefix, eagle3=eagle3, embedding=embedding,
                      embedding_name=embed_name or EMBED, source=str(dlm if kind != "hf-model" else "hf-model"),
                      layer=0 if eagle3 else (layer or 0))
    if eagle3:
        kind = "eagle3-embedding-half"
        notes.append("EAGLE-3 draft: kept q/k columns acting on the embedding only; the fc(target hidden "
                     "states) half is dropped (approximation: the paper's head also sees hidden states)")
    if embedding is None:
        notes.append("DLM has no embedding table: shares the LLM's")
    return head, kind, tensors.total_params, notes


def _embedding_name(names: set[str], config: dict) -> str | None:
    """The draft's token table: its embedding, or its LM head when the two are tied."""
    for name in (EMBED, "embed_tokens.weight"):
        if name in names:
            return name
    return "lm_head.weight" if config.get("tie_word_embeddings") and "lm_head.weight" in names else None


def _fit_vocabulary(embedding: torch.Tensor, geometry: dict) -> torch.Tensor:
    """A draft's table padded with zero rows up to the LLM's vocabulary (same tokenizer, smaller
    padding): the LLM may emit a padding id, which must index a row."""
    rows = int(geometry.get("vocab_size") or 0)
    if rows <= embedding.shape[0]:
        return embedding
    return torch.cat([embedding, embedding.new_zeros(rows - embedding.shape[0], embedding.shape[1])])


def _file_head(path: Any, geometry: dict):
    """A saved RetrievalHead; its DLM is not at hand, so the report has no DLM size."""
    head = RetrievalHead.load(path)
    _check_head_file(head, geometry, path)
    notes = [f"retrieval head file {Path(path).name}"]
    if head.fused:
        notes.append(f"fused: also reads the LLM's hidden states entering layers {list(head.feature_layers)}")
    return head, "head-file", None, notes


def _check_head_file(head: RetrievalHead, geometry: dict, path: Any) -> None:
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


def _who(head: RetrievalHead) -> str:
    return "the retrieval head" if head.source.startswith(("self", "distilled")) else f"the DLM {Path(head.source).name}"


def _report(head: RetrievalHead, dlm_params: int | None, kind: str, level: str, geometry: dict,
            notes: list[str]) -> dict:
    """What was kept; dlm_params None (a head file) leaves the reductions unknown."""
    kept, kept_with_embed = head.param_count(include_embedding=False), head.param_count(include_embedding=True)

    def reduction(count: int) -> float | None:
        return None if dlm_params is None else 1 - count / dlm_params

    return {
        "source": head.source, "kind": head_kind(kind, head.source, head.fused), "format": kind,
        "layer": head.layer, "level": level,
        "llm_attention": geometry["kind"], "selection_groups": head.selection_kv_heads,
        "dlm_params": dlm_params, "head_params": kept, "head_params_with_embedding": kept_with_embed,
        "embedding_shared": head.embedding_shared,
        "reduction": reduction(kept), "reduction_with_embedding": reduction(kept_with_embed),
        "feature_layers": list(head.feature_layers), "rope": head.rope, "notes": notes,
    }

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

import os
from pathlib import Path
from typing import Any

import torch

from specontext_compiler.dlm_geometry import check_draft, check_groups, check_level, dlm_config, llm_groups
from specontext_compiler.errors import ModelError
from specontext_compiler.head_info import NOT_MEASURED, head_file_facts, head_kind
from specontext_compiler.runtime.head_extract import (EMBED, LAYER, Tensors, check_head_file,  # noqa: F401
                                                      config_dict, draft_head, head_from, head_owner,
                                                      llm_geometry, rope_of)
from specontext_compiler.runtime.retrieval_head import RetrievalHead

HEAD_FILE_SUFFIX = ".safetensors"


def selection_kv_heads(geometry: dict, level: str = "head") -> int:
    """`num_kv_heads` for selection.select_tokens: the LLM's selection groups at this level."""
    return llm_groups(geometry, level)


# -- extraction ---------------------------------------------------------------------------------
def _open(obj: Any) -> tuple[Tensors, dict, str]:
    """(tensors, config dict, kind) for a directory, a GGUF file or an in-memory HF model."""
    if isinstance(obj, torch.nn.Module):
        return Tensors(obj), config_dict(obj), "hf-model"
    path = Path(obj)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()):
        from specontext_compiler.smollm2 import load_causal_lm
        _, _, directory = load_causal_lm(path)
        return Tensors(directory), config_dict(directory), "gguf"
    if not path.is_dir():
        raise ModelError(f"DLM {obj!r} is not a directory, a .gguf file, an HF model or 'self[:N]'")
    return Tensors(path), config_dict(path), "hf-directory"


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
    check_groups(head.num_heads, head.num_kv_heads, geometry, level, who=head_owner(head))
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
    head = head_from(tensors, config, LAYER.format(layer=layer), eagle3=False, embedding=None,
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
    head, eagle3 = draft_head(tensors, config, geometry, layer,
                              source=str(dlm if kind != "hf-model" else "hf-model"))
    if eagle3:
        kind = "eagle3-embedding-half"
        notes.append("EAGLE-3 draft: kept q/k columns acting on the embedding only; the fc(target hidden "
                     "states) half is dropped (approximation: the paper's head also sees hidden states)")
    if head.embedding is None:
        notes.append("DLM has no embedding table: shares the LLM's")
    return head, kind, tensors.total_params, notes


def _file_head(path: Any, geometry: dict):
    """A saved RetrievalHead; its DLM is not at hand, so the report has no DLM size."""
    head = RetrievalHead.load(path)
    check_head_file(head, geometry, path)
    notes = [f"retrieval head file {Path(path).name}"]
    if head.fused:
        notes.append(f"fused: also reads the LLM's hidden states entering layers {list(head.feature_layers)}")
    return head, "head-file", None, notes


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


def head_for_plan(dlm: Any, plan: Any) -> RetrievalHead:
    """The head for `plan.bind(..., dlm=)` from a --dlm path (draft directory, GGUF or head file).

    Reading checkpoints is compiler-side work, so the CLI does it here and hands bind the head.
    """
    head, _ = extract_retrieval_head(dlm, plan.model, layer=plan.retrieval_head.layer, level=plan.workload.level)
    return head

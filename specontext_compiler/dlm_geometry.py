"""Whether a retrieval head can drive an LLM's selection: selection groups and vocabulary.

Selection is made per group of the LLM (selection.py): per KV head for GQA (the max over that
KV head's query heads, then a top-k), per head for MHA and MLA, one group for MQA or at batch
level. A head scores with its own query and KV heads, so what must line up is its KV heads with
the LLM's groups, not its query heads with the LLM's: a draft with 14 query / 2 KV heads drives
an LLM with 12 query / 2 KV heads, KV head g of the draft choosing for KV head g of the LLM. When
the head has a multiple of the LLM's groups, consecutive KV heads merge (their query heads' max).

Everything here reads configs only, so a draft model that cannot be used is refused before its
weights are loaded (a GGUF draft is dequantized whole, which takes minutes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specontext_compiler.errors import ModelError, SpecontextError

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


def dlm_config(dlm: Any) -> dict | None:
    """The draft's config as a dict, read without its weights; None when it cannot be read that way."""
    import torch
    if isinstance(dlm, torch.nn.Module):
        return dlm.config.to_dict()
    path = Path(dlm)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    gguf = path if path.suffix == ".gguf" else _single_gguf(path)
    if gguf is None:
        return None
    from specontext_compiler.models import resolve_model
    return resolve_model(gguf).config.to_dict()


def _single_gguf(path: Path) -> Path | None:
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return ggufs[0] if len(ggufs) == 1 else None


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

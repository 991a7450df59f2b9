"""Whether a draft model can drive an LLM's selection, decided from its config before its weights load.

A GGUF draft is dequantized whole (minutes), so its config is read first. The rules themselves
(selection groups, vocabulary) live in runtime/head_extract.py, since bind applies them too: a
head scores with its own query and KV heads, so its KV heads must line up with the LLM's groups
(a draft with 14 query / 2 KV heads drives an LLM with 12 query / 2 KV heads).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specontext_compiler.runtime.head_extract import (LEVELS, check_draft, check_groups, check_level,  # noqa: F401
                                                      check_vocabulary, llm_groups)


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

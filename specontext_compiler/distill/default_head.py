"""Which head a compile without --dlm uses: a cached distilled head, one distilled now, or self:0.

For a model with weights (`default_head_file`):
  1. a head cached for the model's fingerprint (head_cache.py) is used, with one note line naming
     it and its recorded recall;
  2. else, with a CUDA GPU (`on_demand_device`) and distill=True, a head is distilled now with the
     settings of a plain `specontext distill MODEL`, stored in the cache, and used;
  3. else (or when that distill fails on the model, e.g. no tokenizer beside its weights) the LLM's
     own layer 0 (self:0) selects, and one warning line names the command that fixes it.
A preset or config-only model has no weights to distill from: self:0, quietly.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from specontext_compiler.errors import SpecontextError, SpecontextWarning

# What a compile distills on demand: distill_retrieval_head's defaults, which are also those of a
# plain `specontext distill MODEL` (so the cache holds the same head either way).
ON_DEMAND_OPTIONS: dict = {}


class HeadNotice(SpecontextWarning):
    """Information, not a problem: which cached head a compile picked (CLI: one 'note:' line)."""

    label = "note"


def on_demand_device() -> str | None:
    """The device a compile may distill on: "cuda" when torch sees a GPU, else None (CPU distills
    take minutes even for a 135M model, too long to start unasked)."""
    import torch
    return "cuda" if torch.cuda.is_available() else None


def default_head_file(source, model: str, *, distill: bool = True) -> Path | None:
    """The head file for a compile of `source` without --dlm, or None for self:0 (see the module doc)."""
    from specontext_compiler.distill import head_cache
    from specontext_compiler.head_info import default_head_warning, recall_text, weights_present
    if not weights_present(source.path):
        return None
    fingerprint = head_cache.model_fingerprint(source.config, source.path)
    cached = head_cache.cached_head(fingerprint)
    if cached is not None:
        from specontext_compiler.head_info import head_file_facts
        warnings.warn(f"no --dlm: using the distilled head cached for this model, {cached} "
                      f"({recall_text(head_file_facts(cached))}); `--dlm self:0` selects with the model's "
                      "own layer 0 instead", HeadNotice, stacklevel=4)
        return cached
    device = on_demand_device() if distill else None
    if device is None:
        warnings.warn(default_head_warning(model), SpecontextWarning, stacklevel=4)
        return None
    try:
        return distill_into_cache(source.path, fingerprint, source.name, device)
    except SpecontextError as exc:      # e.g. no tokenizer beside the weights: plan as before, and say why
        warnings.warn(f"{default_head_warning(model)}; distilling one now failed: {exc}", SpecontextWarning,
                      stacklevel=4)
        return None


def distill_into_cache(weights: Path, fingerprint: str, name: str, device: str) -> Path:
    """Distill a head from the model at `weights` on `device`, store it in the cache, return its path."""
    from specontext_compiler import smollm2
    from specontext_compiler.distill import distill_retrieval_head, head_cache
    from specontext_compiler.distill.head_file import head_bytes, metadata_record
    progress = ProgressLines(f"distilling a retrieval head for {name} on {device} (cached for later compiles)")
    llm, tokenizer, _ = smollm2.load_causal_lm(weights)
    llm.to(device)
    options = dict(ON_DEMAND_OPTIONS)
    options["seq_len"] = min(options.get("seq_len", 2048), llm.config.max_position_embeddings)
    head, report = distill_retrieval_head(llm, tokenizer, name=name, progress=progress, **options)
    path = head_cache.store_head(head_bytes(head, metadata_record(report)), fingerprint, name)
    progress.line(f"stored {path}")
    return path


def fingerprint_of(model: str) -> tuple[str, Path, str]:
    """(fingerprint, weights path, name) of a distill MODEL argument ('smollm2', a directory, a GGUF):
    the same fingerprint a compile of the weights path computes."""
    from specontext_compiler import models, smollm2
    from specontext_compiler.distill import head_cache
    directory, gguf_file = smollm2.resolve_source(model)
    weights = directory / gguf_file if gguf_file else directory
    source = models.resolve_model(weights)
    return head_cache.model_fingerprint(source.config, weights), weights, source.name


class ProgressLines:
    """Distillation progress as plain stderr lines: each stage as it starts and at each quarter,
    and the validation notes. Plain lines, because a compile's own progress bar holds the terminal."""

    def __init__(self, title: str, stream=None):
        self.stream, self.title, self.shown = stream or sys.stderr, title, set()
        self.line(title)

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        quarter = 4 * done // max(total, 1)
        if (stage, quarter) not in self.shown:
            self.shown.add((stage, quarter))
            self.line(f"  {stage} {done}/{total}")
        if note:
            self.line(f"  {note}")

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

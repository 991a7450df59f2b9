"""What a plan says about its retrieval head: which head, what kind, and how well it is known to select.

Three kinds: "self" (the LLM's own layer-N embedding, norm and Q/K: no training, and on long
contexts it loses most look-ups, benchmarks/ACCURACY.md), "distilled" (a head file trained by
`specontext distill` on the LLM's attention) and "draft model" (a separate, smaller model of the
same tokenizer, as the paper's DLM). A head file may say how it was made: any JSON entry of its
safetensors metadata may hold `teacher_layers` (with `teacher_layers_reason`) and `recall` (a
number, or a {name: value} dict such as {"recall@2048": 0.82}); they are copied into the plan, and
a head without a recorded recall is reported as "not measured".
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

ACCURACY_DOC = "benchmarks/ACCURACY.md"
SELF_HEAD_FINDING = ("8k passkey at budget 2048: 0/5 against 4/5 for full attention on SmolLM2-135M, "
                     + ACCURACY_DOC)
NOT_MEASURED = "not measured"
_FACTS = ("teacher_layers", "teacher_layers_reason")


def head_kind(report_format: str, source: str, fused: bool) -> str:
    """self / distilled / draft model, from how the head was read and what its source says."""
    if report_format == "self" or (report_format == "head-file" and source.startswith("self")
                                   and not fused):
        return "self"
    if report_format == "head-file":
        return "distilled" if fused or source.startswith("distilled") else "draft model"
    return "draft model"


def head_file_facts(path: Any) -> dict:
    """teacher_layers (+ reason) and recall from a head file's metadata; recall_note when absent."""
    facts: dict[str, Any] = {}
    for entry in _metadata_dicts(path):
        for key in _FACTS:
            if key in entry and entry[key] is not None:
                facts.setdefault(key, entry[key])
        recall = entry.get("recall")
        if recall is not None:
            facts.setdefault("recall", recall)
    facts.setdefault("recall", None)
    if facts["recall"] is None:
        facts["recall_note"] = NOT_MEASURED
    return facts


def _metadata_dicts(path: Any) -> list[dict]:
    """Every JSON object among the file's metadata values (and the metadata itself)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (OSError, ValueError):
        return []
    found = [metadata]
    for value in metadata.values():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict):
            found.append(parsed)
    return found


def self_head_record(level: str, groups: int, layer: int = 0) -> dict:
    """The plan record of the default head, built at bind time from the LLM's own weights."""
    return {"source": f"self:{layer}", "kind": "self", "format": "self", "layer": layer, "file": None,
            "feature_layers": [], "level": level, "selection_groups": groups, "teacher_layers": None, "recall": None,
            "recall_note": NOT_MEASURED,
            "note": f"self-derived: the LLM's layer-{layer} embedding, norm and Q/K projections, built at bind time",
            "accuracy": f"loses most long-context look-ups ({SELF_HEAD_FINDING}); pass --dlm for an accurate head"}


def weights_present(path: Path | None) -> bool:
    """True for a GGUF file or a directory that holds weights (not a config-only directory or preset)."""
    if path is None:
        return False
    if path.is_file():
        return path.suffix == ".gguf"
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.gguf"))


def default_head_warning(model: str) -> str:
    """One line: the default head is inaccurate on long contexts, and the command that fixes it
    (its head goes into the cache, where the next compile without --dlm finds it)."""
    model = shlex.quote(str(model))
    return (f"no --dlm and no distilled head cached for this model: the retrieval head is the model's own "
            f"layer-0 projections (self:0), which loses most long-context look-ups ({SELF_HEAD_FINDING}); "
            f"make an accurate head with `specontext distill {model}` (minutes on a GPU; the next compile "
            f"uses it)")


def head_summary(head: dict[str, Any]) -> str:
    """Which head selects (kind, source), at what level, how it was made and its measured recall."""
    parts = [f"{head.get('source', '?')} ({head.get('kind', 'head')})"]
    if head.get("level"):
        parts.append(f"level {head['level']}" + (f", {head['selection_groups']} groups"
                                                 if head.get("selection_groups") else ""))
    if head.get("head_params") is not None:
        parts.append(f"{_number(head['head_params'])} params")
    if head.get("feature_layers"):
        parts.append(f"reads LLM layers {head['feature_layers']}")
    if head.get("teacher_layers"):
        reason = f" ({head['teacher_layers_reason']})" if head.get("teacher_layers_reason") else ""
        parts.append(f"teacher layers {head['teacher_layers']}{reason}")
    parts.append("recall " + recall_text(head))
    return ", ".join(parts)


def recall_text(head: dict[str, Any]) -> str:
    """A head record's recall (a number or {name: value}), or why there is none."""
    recall = head.get("recall")
    if isinstance(recall, dict):
        return " ".join(f"{k} {_number(v)}" for k, v in recall.items())
    return f"{recall:.3f}" if isinstance(recall, (int, float)) else head.get("recall_note", "not measured")


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.3f}" if isinstance(value, float) else str(value)

"""How a distilled head was made, kept inside its safetensors file for `inspect` to show.

The head file is what `RetrievalHead.save` writes; the distiller adds one more metadata entry,
DISTILL_KEY, holding a JSON record (teacher layers and the per-layer scores behind an automatic
choice, loss, data, validation recall). `RetrievalHead.load` reads only its own entry, so a head
with the record loads everywhere a plain one does.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from specontext_compiler.errors import SpecontextError

DISTILL_KEY = "specontext_distill"


def with_metadata(safetensors_bytes: bytes, extra: dict[str, str]) -> bytes:
    """The same safetensors file with `extra` added to its string metadata (header rewritten)."""
    (length,) = struct.unpack("<Q", safetensors_bytes[:8])
    header = json.loads(safetensors_bytes[8:8 + length])
    header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)       # the tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + safetensors_bytes[8 + length:]


def head_bytes(head, record: dict) -> bytes:
    """The head's safetensors file with the distillation `record` (JSON-serializable) in its metadata."""
    return with_metadata(head.to_bytes(), {DISTILL_KEY: json.dumps(record)})


def distill_metadata(path: str | Path) -> dict | None:
    """The distillation record of a head file, or None for a head not made by `specontext distill`."""
    from safetensors import safe_open
    if not Path(path).is_file():
        raise SpecontextError(f"head file {path} does not exist; make one with `specontext distill`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(DISTILL_KEY)
    except Exception as exc:        # safetensors raises its own error types for a foreign file
        raise SpecontextError(f"{path} is not a safetensors head file ({exc})") from None
    return None if text is None else json.loads(text)


def metadata_record(report: dict) -> dict:
    """What of a distillation report goes into the file: the choices and the measured outcome."""
    kept = ("source", "feature_layers", "teacher", "teacher_layers", "teacher_layer_choice", "loss_level",
            "sequences", "seq_len", "epochs", "lr", "recall_documents", "device", "before", "after")
    record = {key: report[key] for key in kept if key in report}
    # The two facts `inspect` and plan.json show (specontext_compiler/head_info.py reads them by
    # these names): why these teacher layers, and the recall measured on held-out distill text.
    choice = report.get("teacher_layer_choice")
    if choice:
        record["teacher_layers_reason"] = choice.get("rule")
    recall = {k: v for k, v in (report.get("after") or {}).items() if k.startswith("recall@")}
    if recall:
        record["recall"] = {f"held-out {k}": v for k, v in recall.items()}
    return record

"""The cache of distilled retrieval heads, one per model, keyed by the model's fingerprint.

`specontext distill MODEL` without -o stores its head here, and `specontext compile MODEL` without
--dlm looks here first (default_head.py). The cache lives beside the GGUF conversion cache, under
smollm2.cache_root() ($SPECONTEXT_CACHE, default ~/.cache/specontext), in `heads/`; a head is
`<model>-<fingerprint>.safetensors`, the file `specontext distill -o` would write plus one metadata
entry, CACHE_KEY, naming the model and fingerprint it was made for. Files without that entry are
not ours: they are never listed, used, replaced or removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

from specontext_compiler.errors import ModelError, SpecontextError

CACHE_KEY = "specontext_head_cache"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
EDGE_BYTES = 1 << 20          # the first and last MiB of each weights file
PROBE_BYTES = 1 << 16         # and this much at each of PROBES evenly spaced offsets
PROBES = 8
# What in a config shapes the head (widths, heads, norm, positions); the weights do the rest.
_GEOMETRY = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
             "rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "layer_types")


def heads_dir() -> Path:
    """$SPECONTEXT_CACHE/heads, or ~/.cache/specontext/heads."""
    from specontext_compiler.smollm2 import cache_root
    return cache_root() / "heads"


def weight_files(path: Path) -> list[Path]:
    """The weights files of a model: the GGUF file itself, or a directory's safetensors/bin/gguf files."""
    if path.is_file():
        return [path]
    return sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})


def model_fingerprint(config, weights: Path) -> str:
    """16 hex digits that change when the head a distill would make changes.

    A distilled head is a function of the model's geometry (hashed field by field from the config)
    and its weight values. For the weights we hash each file's name and size and sampled bytes: the
    first MiB (the safetensors/GGUF header: every tensor's name, dtype and offset, and a GGUF's
    metadata), the last MiB, and PROBES evenly spaced slices through the tensor data. Another
    checkpoint or quantization changes the sizes or the header; a fine-tune changes tensors in every
    layer, so some sampled slice changes too. Reading ~2.5 MiB a file keeps this instant for an 8B
    model; the path and mtime are left out so that a moved or copied model keeps its head.
    """
    files = weight_files(Path(weights))
    if not files:
        raise ModelError(f"{weights} holds no weights (.safetensors, .bin or .gguf); a head is distilled "
                         "from a model's weights, so point at the directory or GGUF file that has them")
    geometry = {key: getattr(config, key, None) for key in _GEOMETRY}
    digest = hashlib.sha256(json.dumps(geometry, sort_keys=True, default=str).encode())
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        digest.update(_sampled_bytes(file))
    return digest.hexdigest()[:16]


def _sampled_bytes(file: Path) -> bytes:
    size = file.stat().st_size
    step = max(1, size // (PROBES + 1))
    spans = [(0, EDGE_BYTES), (max(0, size - EDGE_BYTES), EDGE_BYTES)]
    spans += [(step * (i + 1), PROBE_BYTES) for i in range(PROBES)]
    chunks = []
    with open(file, "rb") as handle:
        for offset, length in spans:
            handle.seek(offset)
            chunks.append(handle.read(length))
    return b"".join(chunks)


def cached_head(fingerprint: str) -> Path | None:
    """The newest cached head made for this fingerprint, or None."""
    found = [path for path in heads_dir().glob(f"*-{fingerprint}.safetensors")
             if cache_record(path).get("fingerprint") == fingerprint]
    return max(found, key=lambda path: path.stat().st_mtime_ns) if found else None


def cache_record(path: Path) -> dict:
    """{model, fingerprint} from a cached head's metadata; {} for any other file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(CACHE_KEY) or "{}")
    except Exception:                 # not safetensors, or not ours: either way no record
        return {}


def store_head(data: bytes, fingerprint: str, model: str) -> Path:
    """Write a head file (safetensors bytes from head_file.head_bytes) into the cache atomically."""
    from specontext_compiler.distill.head_file import with_metadata
    from specontext_compiler.runtime.retrieval_head import RetrievalHead
    directory = heads_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_file_safe(model)}-{fingerprint}.safetensors"
    if path.exists() and not (path.is_file() and RetrievalHead.is_head_file(path)):
        raise SpecontextError(f"refusing to replace {path}: it exists and is not a specontext retrieval head; "
                              "move it out of the head cache")
    record = json.dumps({"model": model, "fingerprint": fingerprint})
    write_file_atomically(with_metadata(data, {CACHE_KEY: record}), path)
    return path


def write_file_atomically(data: bytes, path: Path) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the whole new one.
    The temporary name carries our PID, and only that file is removed on failure."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask's mode
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def list_heads() -> list[dict]:
    """Every cached head, newest first: model, fingerprint, teacher layers, recall, bytes, path."""
    from specontext_compiler.distill.head_file import distill_metadata
    heads = []
    for path in sorted(heads_dir().glob("*.safetensors"), key=lambda path: -path.stat().st_mtime_ns):
        record = cache_record(path)
        if not record.get("fingerprint"):
            continue
        made = distill_metadata(path) or {}
        heads.append({"model": record.get("model"), "fingerprint": record["fingerprint"],
                      "teacher_layers": made.get("teacher_layers"), "recall": made.get("recall"),
                      "bytes": path.stat().st_size, "path": str(path)})
    return heads


def _file_safe(name: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model")[:80]

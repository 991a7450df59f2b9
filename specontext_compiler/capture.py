"""Capture one forward step of a Hugging Face causal LM as an FX graph (torch.export).

The model is built on the meta device (no weights, no memory) and its attention is routed through
HF's AttentionInterface to specontext::attention, so each layer's attention is one node that sees
q/k/v after RoPE and before GQA expansion. The forward is exported without a KV cache: the cache
lives in the runtime (runtime/step_context.py), and the graph stays a pure function of
(weights, input_ids, position_ids). Batch and token count are dynamic, so one graph serves
prefill (T > 1) and decode (T = 1). This is the only module that knows how HF models export.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from specontext_compiler import models
from specontext_compiler.errors import ModelError
from specontext_compiler.passes.common import META_KEY, WeightInput
from specontext_compiler.runtime import ops  # noqa: F401  (registers the specontext:: ops)

ATTENTION_NAME = "specontext"
INPUT_NAMES = ("input_ids", "position_ids")
_KINDS = {"PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant"}


@dataclass
class Captured:
    """An exported forward: the graph, its user inputs, and its weight placeholders."""

    graph_module: torch.fx.GraphModule
    input_names: tuple[str, ...]          # the user inputs, after the weight placeholders
    param_names: list[dict]               # [{placeholder, target (state-dict name), kind}] in order
    seconds: float                        # wall time of build + export


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention function: q [B,Hq,T,D], k/v [B,Hkv,T,D] -> ([B,T,Hq,Dv], no weights)."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.specontext.attention(query, key, value, module.layer_idx, scale), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, _attention)


def capture_decode_graph(config, dtype: torch.dtype = torch.bfloat16, max_batch: int = 4096) -> Captured:
    """Export forward(input_ids [B,T], position_ids [B,T]) -> the last token's logits [B,1,vocab],
    with B, T dynamic."""
    start = time.perf_counter()
    _register_attention()
    # A copy: setting the attention implementation writes into the config object.
    model = models.build_meta_model(copy.deepcopy(config), dtype=dtype)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError) as exc:
        raise ModelError(f"{type(model).__name__} cannot route attention through transformers' "
                         f"AttentionInterface ({exc}); use a model that supports attn_implementation") from None
    # Example sizes above 1 keep export from specializing B or T to a constant.
    ids = torch.ones(2, 3, dtype=torch.long, device="meta")
    pos = torch.ones(2, 3, dtype=torch.long, device="meta")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    tokens = torch.export.Dim("tokens", min=1, max=max(2, config.max_position_embeddings))
    kwargs = {"input_ids": ids, "position_ids": pos, "use_cache": False, **_last_logits_only(model)}
    dims = {"input_ids": {0: batch, 1: tokens}, "position_ids": {0: batch, 1: tokens},
            **{name: None for name in kwargs if name not in INPUT_NAMES}}
    with torch.no_grad():
        program = torch.export.export(model, (), kwargs, dynamic_shapes=dims, strict=False)
    gm = program.graph_module
    param_names = _weight_placeholders(program)
    _drop_constant_inputs(gm, program)
    _check_inputs(gm, param_names)
    _annotate_weights(gm, param_names)
    return Captured(gm, INPUT_NAMES, param_names, time.perf_counter() - start)


def _last_logits_only(model) -> dict:
    """HF's logits_to_keep=1 where the model takes it: the graph's LM head sees only the last token.

    A prefill of T tokens then computes [B, 1, vocab] logits, not [B, T, vocab] in fp32 (4 GB for
    a 8k-token chunk of a 128k-vocabulary model); decode (T = 1) is unchanged."""
    import inspect
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _weight_placeholders(program) -> list[dict]:
    """Placeholder -> state-dict name for the leading parameter/buffer placeholders."""
    out = []
    for spec in program.graph_signature.input_specs:
        kind = _KINDS.get(spec.kind.name)
        if kind is not None:
            out.append({"placeholder": spec.arg.name, "target": spec.target, "kind": kind})
    return out


def _drop_constant_inputs(gm: torch.fx.GraphModule, program) -> None:
    """use_cache=False (and logits_to_keep=1) export as placeholders nobody reads: remove them so
    inputs are (ids, pos)."""
    constants = {spec.arg.name for spec in program.graph_signature.input_specs
                 if spec.kind.name == "USER_INPUT" and spec.arg.name not in INPUT_NAMES}
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.name in constants:
            if node.users:
                raise ModelError(f"the exported forward reads its constant input {node.name!r}; "
                                 "this architecture is not supported")
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _annotate_weights(gm: torch.fx.GraphModule, param_names: list[dict]) -> None:
    """Each weight placeholder carries its state-dict name, so passes report HF names."""
    by_name = {p["placeholder"]: p for p in param_names}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in by_name:
            entry = by_name[node.name]
            node.meta[META_KEY] = WeightInput(entry["target"], entry["kind"])


def _check_inputs(gm: torch.fx.GraphModule, param_names: list[dict]) -> None:
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    expected = [p["placeholder"] for p in param_names] + list(INPUT_NAMES)
    assert placeholders == expected, f"unexpected graph inputs {placeholders[len(param_names):]}"

"""The specontext:: custom ops: the nodes the compiler's passes put in the decode graph.

Each op is registered with torch.library so torch.export keeps it as one node, with a fake
(meta) implementation for capture on the meta device. The real implementation dispatches to
the runtime's active StepContext (runtime/context.py), which owns the KV store, the retrieval
head and the copy stream: the graph stays a pure function of (weights, input_ids, position_ids)
while the KV state lives in the runtime, as in a serving engine.

Shapes (B requests, T new tokens, Hq query heads, Hkv KV heads, D head dim, G selection groups,
K selected tokens per group):
  attention(q [B,Hq,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], layer, scaling) -> [B,T,Hq,Dv]
  retrieve(input_ids [B,T], position_ids [B,T]) -> indices [B,G,K] int32 (-1 = empty slot)
  sparse_attention(q, k, v, indices, layer, scaling, ready) -> [B,T,Hq,Dv]
  prefetch_issue(indices, layer) -> ticket [1] int64
  prefetch_wait(ticket, layer) -> ready [1] int64
  record_features(hidden [B,T,H], block) -> nothing (a fused head's tap on the residual stream)
  all_reduce(partial [B,T,H]) -> [B,T,H] (tensor-parallel plans: the sum over the ranks)
The fused elementwise ops (FuseElementwise: each replaces a run of small aten nodes; pure
functions of their inputs, Triton on CUDA, the PyTorch reference elsewhere):
  rms_norm(x [...,N], weight [N], eps, dtype) -> [...,N]
  add_rms_norm(a, b, weight, eps, dtype) -> (a + b, rms_norm(a + b))
  rotary(x [B,H,T,D], cos, sin) -> [B,H,T,D] (rotate-half RoPE; cos/sin broadcast to x)
  silu_mul(gate, up) -> silu(gate) * up
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch.fx.node import has_side_effect

from specontext_compiler.runtime import context

NAMESPACE = "specontext"


@torch.library.custom_op("specontext::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scaling: float) -> torch.Tensor:
    """Dense attention over the layer's whole cache (the op the capture puts at each attention)."""
    return context.current().dense_attention(q, k, v, layer, scaling)


@attention.register_fake
def _attention_fake(q, k, v, layer, scaling):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@torch.library.custom_op("specontext::retrieve", mutates_args=())
def retrieve(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Run the retrieval head on the new tokens and select the KV rows for every layer."""
    return context.current().retrieve(input_ids, position_ids)


@retrieve.register_fake
def _retrieve_fake(input_ids, position_ids):
    ctx = torch.library.get_ctx()
    groups = ctx.new_dynamic_size()
    width = ctx.new_dynamic_size()
    return input_ids.new_empty(input_ids.shape[0], groups, width, dtype=torch.int32)


@torch.library.custom_op("specontext::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     layer: int, scaling: float, ready: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the selected rows only (plus sinks, recent window and the new token)."""
    return context.current().sparse_attention(q, k, v, indices, layer, scaling)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, indices, layer, scaling, ready=None):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])


@torch.library.custom_op("specontext::prefetch_issue", mutates_args=())
def prefetch_issue(indices: torch.Tensor, layer: int) -> torch.Tensor:
    """Start copying the rows of an offloaded layer that were not selected last step."""
    return context.current().prefetch_issue(indices, layer)


@prefetch_issue.register_fake
def _prefetch_issue_fake(indices, layer):
    return indices.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("specontext::prefetch_wait", mutates_args=())
def prefetch_wait(ticket: torch.Tensor, layer: int) -> torch.Tensor:
    """Make the compute stream wait for a layer's prefetch (its CUDA event)."""
    return context.current().prefetch_wait(ticket, layer)


@prefetch_wait.register_fake
def _prefetch_wait_fake(ticket, layer):
    return ticket.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("specontext::record_features", mutates_args=())
def record_features(hidden: torch.Tensor, block: int) -> None:
    """Keep the hidden state entering one of a fused head's feature layers (block: its index there)."""
    context.current().record_features(hidden, block)


@record_features.register_fake
def _record_features_fake(hidden, block):
    return None


@torch.library.custom_op("specontext::all_reduce", mutates_args=())
def all_reduce(partial: torch.Tensor) -> torch.Tensor:
    """Sum a row-parallel projection's partial outputs over the tensor-parallel ranks (torch.distributed)."""
    from specontext_compiler.runtime import tensor_parallel
    return tensor_parallel.all_reduce_sum(partial)


@all_reduce.register_fake
def _all_reduce_fake(partial):
    return torch.empty_like(partial)


def _fused(family: str, name: str, device: torch.device):
    """A fused op's implementation: the Triton launcher on CUDA, else the reference (which runs
    exactly the unfused graph's ops, so a CPU engine's tokens do not change with fusion)."""
    module = importlib.import_module(f"specontext_compiler.runtime.kernels.{family}")
    return getattr(module, name if device.type == "cuda" else f"{name}_reference")


@torch.library.custom_op("specontext::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), the Llama-family RMSNorm."""
    return _fused("rms_norm", "rms_norm", x.device)(x, weight, eps, dtype)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, dtype):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype))


@torch.library.custom_op("specontext::add_rms_norm", mutates_args=())
def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + b, rms_norm(a + b)): a residual add and the norm that reads it."""
    return _fused("rms_norm", "add_rms_norm", a.device)(a, b, weight, eps, dtype)


@add_rms_norm.register_fake
def _add_rms_norm_fake(a, b, weight, eps, dtype):
    return (a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype)),
            a.new_empty(a.shape, dtype=torch.promote_types(weight.dtype, dtype)))


@torch.library.custom_op("specontext::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin."""
    return _fused("rotary", "rotary", x.device)(x, cos, sin)


@rotary.register_fake
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x, dtype=torch.result_type(x, cos))


@torch.library.custom_op("specontext::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated MLP's activation."""
    return _fused("silu_mul", "silu_mul", gate.device)(gate, up)


@silu_mul.register_fake
def _silu_mul_fake(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.result_type(gate, up))


# The tap's effect is on the runtime's buffers and nothing reads its (empty) output: declared
# effectful, so that dead-code elimination keeps it.
has_side_effect(torch.ops.specontext.record_features.default)

OP_NAMES = ("attention", "retrieve", "sparse_attention", "prefetch_issue", "prefetch_wait", "record_features",
            "all_reduce", "rms_norm", "add_rms_norm", "rotary", "silu_mul")


def op(name: str):
    """The OpOverload of one of ours, e.g. op('sparse_attention')."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default

"""Fuse the decode graph's runs of small elementwise nodes into one op each.

At decode batch sizes a layer's GEMMs read its weights in ~0.15 ms on an H200, while the ~40 small
kernels around them (each RMSNorm is eight, each RoPE five, the MLP's activation two, the residual
adds one each) move a few KB apiece and cost their launch and ramp time: about as much again
(benchmarks/RESULTS.md, the 128k step's profile: "other" kernels 4.1 ms of a 12 ms step). This pass
matches those runs in the aten graph and replaces each by one specontext:: op (runtime/ops.py):

  x32 = to(x, f32); weight * to(x32 * rsqrt(mean(pow(x32, 2), -1) + eps), dtype)  -> rms_norm
  rms_norm(add(a, b), ...) where the sum is also the residual                       -> add_rms_norm
  x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin                                   -> rotary
  silu(gate) * up                                                                    -> silu_mul

A run is fused only when it is exactly that (same ops, same operand roles, intermediate values
used nowhere else), so a model whose norm or rotation differs (Gemma's (1 + w), interleaved RoPE)
keeps its unfused nodes: fusion changes speed, never results beyond rounding order.

Requires: nothing (runs on any captured graph; the pipeline runs it last).
Ensures:  the graph holds one fused op per fusion counted, and still lints.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import count_ops, finish, is_call
from specontext_compiler.runtime import ops

aten = torch.ops.aten
_TO = (aten.to.dtype, aten._to_copy.default)
_LAST_DIM_SLICE_END = 2 ** 63 - 1          # what export writes for x[..., half:]


class FuseElementwise(PassBase):
    """Replace RMSNorm, residual add + RMSNorm, rotate-half RoPE and silu * up by fused ops."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def call(self, gm: GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if is_call(node, aten.rsqrt.default):
                self._fuse_rms_norm(gm, node)
        for node in list(gm.graph.nodes):
            if is_call(node, ops.op("rms_norm")):
                self._fuse_residual_add(gm, node)
        for node in list(gm.graph.nodes):
            if is_call(node, aten.cat.default):
                self._fuse_rotary(gm, node)
        for node in list(gm.graph.nodes):
            if is_call(node, aten.silu.default):
                self._fuse_silu_mul(gm, node)
        finish(gm)
        return PassResult(gm, bool(self.counters))

    # --- RMSNorm -------------------------------------------------------------------------------
    def _fuse_rms_norm(self, gm: GraphModule, rsqrt: Node) -> None:
        match = _match_rms_norm(rsqrt)
        if match is None:
            return
        x, weight, eps, dtype, output, dead = match
        with gm.graph.inserting_before(output):
            fused = gm.graph.call_function(ops.op("rms_norm"), (x, weight, eps, dtype))
        _replace(gm, output, fused, dead)
        self.counters["rms_norm"] += 1

    def _fuse_residual_add(self, gm: GraphModule, norm: Node) -> None:
        add = norm.args[0]
        if not (is_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs
                and all(isinstance(a, Node) for a in add.args) and _same_shape(*add.args)):
            return
        with gm.graph.inserting_before(add.next):     # in order, right after the add
            fused = gm.graph.call_function(ops.op("add_rms_norm"), (*add.args, *norm.args[1:]))
            total = gm.graph.call_function(operator.getitem, (fused, 0))
            normed = gm.graph.call_function(operator.getitem, (fused, 1))
        _copy_val(add, total)
        _copy_val(norm, normed)
        norm.replace_all_uses_with(normed)
        add.replace_all_uses_with(total)
        gm.graph.erase_node(norm)
        gm.graph.erase_node(add)
        self.counters["add_rms_norm"] += 1

    # --- RoPE ----------------------------------------------------------------------------------
    def _fuse_rotary(self, gm: GraphModule, cat: Node) -> None:
        match = _match_rotary(cat)
        if match is None:
            return
        x, cos, sin, output, dead = match
        with gm.graph.inserting_before(output):
            fused = gm.graph.call_function(ops.op("rotary"), (x, cos, sin))
        _replace(gm, output, fused, dead)
        self.counters["rotary"] += 1

    # --- gated MLP -----------------------------------------------------------------------------
    def _fuse_silu_mul(self, gm: GraphModule, silu: Node) -> None:
        mul = _only_user(silu)
        if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2:
            return
        up = _other(mul, silu)
        if not isinstance(up, Node) or not _same_shape(silu.args[0], up):
            return
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(ops.op("silu_mul"), (silu.args[0], up))
        _replace(gm, mul, fused, [silu])
        self.counters["silu_mul"] += 1

    def ensures(self, gm: GraphModule) -> None:
        counts = count_ops(gm)
        placed = {name: counts[f"specontext.{name}.default"] for name in ("rms_norm", "add_rms_norm", "rotary", "silu_mul")}
        # each add_rms_norm absorbed one fused rms_norm
        expected = {**{name: self.counters[name] for name in placed},
                    "rms_norm": self.counters["rms_norm"] - self.counters["add_rms_norm"]}
        assert placed == expected, f"fused ops in the graph {placed} != the pass's count {expected}"


def _match_rms_norm(rsqrt: Node):
    """(x, weight, eps, dtype, output node, nodes that die) if rsqrt is the heart of an RMSNorm."""
    add = rsqrt.args[0]
    if not (is_call(add, aten.add.Tensor) and isinstance(add.args[1], float) and _single_user(add)):
        return None
    mean = add.args[0]
    if not (is_call(mean, aten.mean.dim) and list(mean.args[1]) in ([-1],) and _keepdim(mean)
            and _single_user(mean)):
        return None
    square = mean.args[0]
    if not (is_call(square, aten.pow.Tensor_Scalar) and square.args[1] == 2 and _single_user(square)):
        return None
    x32 = square.args[0]
    scale = _only_user(rsqrt)
    if not (is_call(scale, aten.mul.Tensor) and _other(scale, rsqrt) is x32 and _single_user(scale)):
        return None
    cast = _only_user(scale)
    if not (is_call(cast, aten.to.dtype) and len(cast.args) == 2 and not cast.kwargs):
        return None
    output = _only_user(cast)
    if not (is_call(output, aten.mul.Tensor) and len(output.args) == 2):
        return None
    weight = _other(output, cast)
    if not (isinstance(weight, Node) and _is_vector_of(weight, x32)):
        return None
    x, dead = _float32_source(x32, {square, scale})
    if x is None:
        return None
    return x, weight, float(add.args[1]), cast.args[1], output, [cast, scale, rsqrt, add, mean, square, *dead]


def _float32_source(x32: Node, readers: set):
    """(x, [the cast if it dies]): the norm's input before its cast to float32.

    A float32 capture writes the cast as to(x, <the weights' dtype>) (CleanCapture), a no-op at
    that dtype that the residual add may read too: the cast then stays for its other readers.
    """
    val = x32.meta.get("val")
    float32 = isinstance(val, torch.Tensor) and val.dtype == torch.float32
    if is_call(x32, aten.to.dtype) and len(x32.args) == 2 and (x32.args[1] == torch.float32 or float32):
        return x32.args[0], [x32] if set(x32.users) == readers else []
    if float32:
        return x32, []          # already float32: the graph has no cast to drop
    return None, []


def _match_rotary(cat: Node):
    """(x, cos, sin, output node, nodes that die) if cat is rotate_half(x) inside x*cos + rot*sin."""
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, 3)):
        return None
    neg, low = parts
    if not (is_call(neg, aten.neg.default) and _single_user(neg) and is_call(low, aten.slice.Tensor)):
        return None
    high = neg.args[0]
    if not is_call(high, aten.slice.Tensor) or not _single_user(high) or not _single_user(low):
        return None
    x = high.args[0]
    width = _last_dim(x)
    if width is None or width % 2 or low.args[0] is not x:
        return None
    half = width // 2
    if _slice_range(high, width) != (half, width) or _slice_range(low, width) != (0, half):
        return None
    rotated_term = _only_user(cat)
    if not (is_call(rotated_term, aten.mul.Tensor) and len(rotated_term.args) == 2 and _single_user(rotated_term)):
        return None
    sin = _other(rotated_term, cat)
    output = _only_user(rotated_term)
    if not (is_call(output, aten.add.Tensor) and len(output.args) == 2 and not output.kwargs):
        return None
    direct_term = _other(output, rotated_term)
    if not (is_call(direct_term, aten.mul.Tensor) and len(direct_term.args) == 2 and _single_user(direct_term)
            and x in direct_term.args):
        return None
    cos = _other(direct_term, x)
    if not all(isinstance(t, Node) and _last_dim(t) == width for t in (cos, sin)):
        return None
    return x, cos, sin, output, [direct_term, rotated_term, cat, neg, high, low]


def _slice_range(node: Node, width: int):
    """(start, end) of a slice on the last dimension, end clamped to the width."""
    args = list(node.args) + [None] * (4 - len(node.args))
    _, dim, start, end = args[:4]
    if dim not in (-1, 3) or node.kwargs or len(node.args) > 5 or (len(node.args) == 5 and node.args[4] != 1):
        return None
    start = 0 if start is None else start
    end = width if end is None or end == _LAST_DIM_SLICE_END else end
    if dim == 3 and len(_shape(node.args[0]) or ()) != 4:
        return None
    return start, min(end, width)


# --- small helpers ---------------------------------------------------------------------------
def _replace(gm: GraphModule, output: Node, fused: Node, dead: list) -> None:
    _copy_val(output, fused)
    output.replace_all_uses_with(fused)
    gm.graph.erase_node(output)
    for node in dead:                       # producers after consumers: each is unused when erased
        if not node.users:
            gm.graph.erase_node(node)


def _copy_val(source: Node, target: Node) -> None:
    """Keep the shape/dtype facts later passes and the report read."""
    for key in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
        if key in source.meta:
            target.meta[key] = source.meta[key]


def _single_user(node: Node) -> bool:
    return len(node.users) == 1


def _only_user(node: Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: Node, one):
    """The operand of a binary node that is not `one` (None if `one` is not an operand)."""
    first, second = node.args[:2]
    if first is one:
        return second
    if second is one:
        return first
    return None


def _keepdim(mean: Node) -> bool:
    return (len(mean.args) > 2 and mean.args[2] is True) or mean.kwargs.get("keepdim") is True


def _shape(node):
    """The node's shape as strings: symbolic sizes (the batch) compare by name, without guards."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(str(size) for size in val.shape) if isinstance(val, torch.Tensor) else None


def _last_dim(node):
    shape = _shape(node)
    return int(shape[-1]) if shape and shape[-1].isdigit() else None


def _same_shape(a, b) -> bool:
    shape_a, shape_b = _shape(a), _shape(b)
    return shape_a is not None and shape_a == shape_b


def _is_vector_of(weight: Node, x: Node) -> bool:
    """The norm's weight: one value per element of x's last dimension."""
    shape = _shape(weight)
    return shape is not None and len(shape) == 1 and _last_dim(weight) == _last_dim(x) is not None

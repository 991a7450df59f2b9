"""Find every layer's attention and record what the planner needs about it (paper s.4: per-layer KV).

Each `specontext::attention` node gets an AttentionSite in node.meta["specontext"]: the layer
(parsed once, from nn_module_stack), the q/k/v/o projection weights (found by walking producers
and users to the nearest linear), head counts and widths (from the fake tensors export left in
node.meta["val"]), whether RoPE reaches q, and the attention kind.

Kind: MLA when q and v widths differ with one k/v head per query head (DeepSeek's latent
attention expands its compressed KV per head before the op); else MHA / MQA / GQA by head counts.

Requires: at least one specontext::attention node (capture routes attention there).
Ensures:  every attention node carries an AttentionSite; layers are distinct.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import (LINEAR_OPS, META_KEY, AttentionSite, PassError, is_call,
                                               layer_of_path, module_paths, nodes_of, placeholder_name)
from specontext_compiler.runtime.model_spec import attention_kind

_ROTATION_OPS = (torch.ops.aten.cos.default, torch.ops.aten.sin.default,
                 torch.ops.aten.view_as_complex.default, torch.ops.aten.polar.default)
_WALK_LIMIT = 500   # nodes visited per search: a projection is a handful of ops from the attention


def _inputs(node: Node) -> list[Node]:
    return [n for n in node.all_input_nodes]


def _nearest(start: Node, step, stop) -> Node | None:
    """Breadth-first from `start` along `step` (producers or users) to the first node with `stop`."""
    frontier, seen = [start], {start}
    while frontier and len(seen) < _WALK_LIMIT:
        node = frontier.pop(0)
        if node is not start and stop(node):
            return node
        for nxt in step(node):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return None


def _weight_name(linear: Node | None) -> str | None:
    return placeholder_name(linear.args[1]) if linear is not None and len(linear.args) > 1 else None


def _rotation(q: Node) -> tuple[bool, str | None]:
    """Whether a rotation (cos/sin or complex multiply) reaches q before its projection, and its buffer."""
    is_linear = lambda n: is_call(n, *LINEAR_OPS)  # noqa: E731
    rotation = _nearest(q, lambda n: [] if is_linear(n) else _inputs(n), lambda n: is_call(n, *_ROTATION_OPS))
    if rotation is None:
        return False, None
    buffer = _nearest(rotation, _inputs, lambda n: n.op == "placeholder" and n.name.startswith("b_"))
    return True, placeholder_name(buffer)


def classify(num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int) -> str:
    """mha / gqa / mqa / mla from the shapes the attention op sees (the module docstring says how)."""
    latent = num_kv_heads == num_heads and v_head_dim != head_dim
    return attention_kind(num_heads, num_kv_heads, latent=latent)


def _site(node: Node) -> AttentionSite:
    q, k, v, layer_arg, scaling = node.args[:5]
    shapes = [getattr(x, "meta", {}).get("val") for x in (q, k, v)]
    if any(s is None for s in shapes):
        raise PassError(f"FindAttention: attention node {node.name} has no shape metadata; "
                        "capture the graph with torch.export (capture_decode_graph)")
    (_, heads, _, head_dim), (_, kv_heads, _, _), (_, _, _, v_dim) = (tuple(s.shape) for s in shapes)
    paths = [p for p in module_paths(node) if layer_of_path(p) is not None]
    layer = layer_of_path(paths[-1]) if paths else int(layer_arg)
    assert layer == int(layer_arg), f"nn_module_stack says layer {layer}, the op says {layer_arg}"
    is_linear = lambda n: is_call(n, *LINEAR_OPS)  # noqa: E731
    projections = [_weight_name(_nearest(x, _inputs, is_linear)) for x in (q, k, v)]
    o_proj = _weight_name(_nearest(node, lambda n: list(n.users), is_linear))
    rope, rope_source = _rotation(q)
    heads, kv_heads, head_dim, v_dim = int(heads), int(kv_heads), int(head_dim), int(v_dim)
    return AttentionSite(layer=layer, module=paths[-1] if paths else f"layers.{layer}",
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_dim,
                         kind=classify(heads, kv_heads, head_dim, v_dim), scaling=float(scaling),
                         q_proj=projections[0], k_proj=projections[1], v_proj=projections[2], o_proj=o_proj,
                         rope=rope, rope_source=rope_source)


class FindAttention(PassBase):
    """Annotate each specontext::attention node with its AttentionSite."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if not nodes_of(gm, "attention"):
            raise PassError("FindAttention: the graph has no specontext::attention node; capture the model "
                            "with capture_decode_graph so attention routes through the specontext op")

    def call(self, gm: GraphModule) -> PassResult:
        for node in nodes_of(gm, "attention"):
            site = _site(node)
            node.meta[META_KEY] = site
            self.counters["attention_sites"] += 1
            self.counters[f"kind_{site.kind}"] += 1
        return PassResult(gm, False)

    def ensures(self, gm: GraphModule) -> None:
        nodes = nodes_of(gm, "attention")
        layers = [n.meta[META_KEY].layer for n in nodes]
        assert all(isinstance(n.meta.get(META_KEY), AttentionSite) for n in nodes)
        if len(set(layers)) != len(layers):
            raise PassError(f"FindAttention: layers {sorted(layers)} appear more than once; "
                            "each decoder layer must have exactly one attention")

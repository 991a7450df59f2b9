"""What the passes share: the facts they record in node.meta["specontext"], and graph helpers.

Every fact is a frozen dataclass under the one key META_KEY, so later passes and the report read
the same record (as torch's ShapeProp does with node.meta["tensor_meta"]).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime import ops

META_KEY = "specontext"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class PassError(SpecontextError):
    """A pass cannot transform this graph; the message names the pass and what is missing."""


@dataclass(frozen=True)
class WeightInput:
    """A placeholder bound to a model tensor (set by capture, or by MergeProjections for a merged
    weight): its state-dict name and kind."""

    target: str                   # e.g. "model.layers.0.self_attn.q_proj.weight"
    kind: str                     # parameter / buffer / constant / merged
    parts: tuple[str, ...] = ()   # merged: the state-dict names concatenated, in order
    dim: int = 0                  # merged: the dimension they are concatenated along

    def record(self, placeholder: str) -> dict:
        """plan.json's graph.inputs entry for the placeholder of this name."""
        entry = {"placeholder": placeholder, "target": self.target, "kind": self.kind}
        if self.kind == "merged":
            entry.update(parts=list(self.parts), dim=self.dim)
        return entry


@dataclass(frozen=True)
class AttentionSite:
    """One layer's attention as found in the graph (FindAttention)."""

    layer: int
    module: str                   # e.g. "model.layers.0.self_attn"
    num_heads: int                # query heads
    num_kv_heads: int             # heads of k/v as they reach the op (MLA: expanded per head)
    head_dim: int                 # q/k width
    v_head_dim: int               # v width (differs from head_dim for MLA)
    kind: str                     # mha / gqa / mqa / mla
    scaling: float
    q_proj: str | None            # state-dict names of the projection weights
    k_proj: str | None
    v_proj: str | None
    o_proj: str | None
    rope: bool                    # a cos/sin (or complex) rotation reaches q
    rope_source: str | None       # the buffer the rotation is computed from (inv_freq)


@dataclass(frozen=True)
class SparseAttentionSite:
    """An attention rewritten to attend over selected rows; selection sizes are plan parameters."""

    site: AttentionSite


@dataclass(frozen=True)
class RetrievalSite:
    """The one retrieval-head node: its indices feed every layer's sparse attention."""

    layers: tuple[int, ...]


@dataclass(frozen=True)
class PrefetchSite:
    """One prefetch node of an offloaded layer: issued before `issue_before_layer`'s attention."""

    layer: int
    role: str                     # "issue" or "wait"
    issue_before_layer: int


def op_name(overload) -> str:
    """'specontext.attention.default' style name of a call target."""
    return str(overload)


def count_ops(gm: GraphModule) -> Counter:
    """Counts of call_function targets by name, e.g. counts['specontext.attention.default']."""
    return Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def nodes_of(gm: GraphModule, name: str) -> list[Node]:
    """The call nodes of one specontext:: op, in graph order (name as in ops.OP_NAMES)."""
    target = ops.op(name)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def attention_sites(gm: GraphModule) -> list[tuple[AttentionSite, Node]]:
    """(site, node) for every annotated attention or sparse attention node, by layer."""
    found = []
    for node in gm.graph.nodes:
        fact = node.meta.get(META_KEY)
        if isinstance(fact, SparseAttentionSite):
            fact = fact.site
        if isinstance(fact, AttentionSite):
            found.append((fact, node))
    return sorted(found, key=lambda pair: pair[0].layer)


def layer_of_path(path: str) -> int | None:
    """Layer index in a module path such as 'model.layers.12.self_attn'."""
    match = _LAYER_RE.search(path)
    return int(match.group(1)) if match else None


def module_paths(node: Node) -> list[str]:
    """The module paths on a node's nn_module_stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values()]


def placeholder_name(node: object) -> str | None:
    """State-dict name of a weight placeholder (or its graph name if capture did not annotate it)."""
    if isinstance(node, Node) and node.op == "placeholder":
        fact = node.meta.get(META_KEY)
        return fact.target if isinstance(fact, WeightInput) else node.name
    return None


def weight_inputs(gm: GraphModule) -> list[dict]:
    """graph.inputs records of the weight placeholders, in placeholder order (after any pass that
    replaced some, e.g. MergeProjections); a placeholder without a WeightInput is not a weight."""
    return [node.meta[META_KEY].record(node.name) for node in gm.graph.nodes
            if node.op == "placeholder" and isinstance(node.meta.get(META_KEY), WeightInput)]


def finish(gm: GraphModule) -> None:
    """Check and regenerate code after an edit."""
    gm.graph.lint()
    gm.recompile()


def is_call(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


LINEAR_OPS = (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
              torch.ops.aten.matmul.default)

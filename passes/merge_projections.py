"""Merge the projections that read the same input into one GEMM over the concatenated weight.

At decode batch sizes a projection is a thin GEMM whose time is its weight's bytes plus a fixed
cost per launch (and, for the small ones, a split-K reduction of its own): a layer's q, k and v
read one normed hidden state in three GEMMs, its gate and up in two more. One GEMM over the
weights stacked by rows reads the same bytes once, in one launch, as vLLM's merged QKV and
gate-up layers do. This pass finds, for each input x, the linears

  linear(x, W_i)   (no bias; W_i a weight placeholder read by nothing else; one dtype, one width)

and, where there are two or more, replaces them by one new weight placeholder W = cat(W_1..W_n)
(rows, in graph order), one linear(x, W) and one last-dimension slice per former output. The
slices are views (each row strided by W's height), which the ops downstream take as they are.
The merged placeholder's WeightInput (kind "merged") names its parts; the runtime builds W at bind
time and re-points each part's Parameter to its rows of W, so the weights are held once
(runtime/weights.py). It stands where the first part's placeholder stood, so the weights keep their
order and still precede input_ids, position_ids.

Requires: not a tensor-parallel graph (its runtime shards each weight by its state-dict name).
Ensures:  no two mergeable linears share an input; one merged placeholder per merge, read by one linear.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import META_KEY, PassError, WeightInput, finish, is_call, nodes_of

aten = torch.ops.aten
MERGED = "merged"


class MergeProjections(PassBase):
    """Replace each group of linears over one input by one linear over the concatenated weight."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if nodes_of(gm, "all_reduce"):
            raise PassError("MergeProjections: a tensor-parallel graph binds each weight's shard by its name; "
                            "its projections cannot be merged")

    def call(self, gm: GraphModule) -> PassResult:
        for linears in mergeable_groups(gm):
            self._merge(gm, linears)
        finish(gm)
        return PassResult(gm, bool(self.counters))

    def _merge(self, gm: GraphModule, linears: list[Node]) -> None:
        x, weights = linears[0].args[0], [linear.args[1] for linear in linears]
        parts = tuple(w.meta[META_KEY].target for w in weights)
        name = merged_name(parts)
        with gm.graph.inserting_before(weights[0]):
            weight = gm.graph.placeholder("p_" + re.sub(r"\W", "_", name))
        weight.meta[META_KEY] = WeightInput(name, MERGED, parts, 0)
        with gm.graph.inserting_before(linears[0]):
            merged = gm.graph.call_function(aten.linear.default, (x, weight))
            start, outputs = 0, []
            for part in weights:
                rows = int(part.meta["val"].shape[0])
                outputs.append(gm.graph.call_function(aten.slice.Tensor, (merged, -1, start, start + rows)))
                start += rows
        _set_vals(weights, weight, merged, outputs)
        merged.meta["nn_module_stack"] = _common_stack(linears)
        for linear, output in zip(linears, outputs):
            for key in ("nn_module_stack", "stack_trace"):
                if key in linear.meta:
                    output.meta[key] = linear.meta[key]
            linear.replace_all_uses_with(output)
            gm.graph.erase_node(linear)
        for part in weights:                        # read by its linear only (mergeable_groups checked)
            gm.graph.erase_node(part)
        self.counters["merges"] += 1
        self.counters["parts"] += len(weights)

    def ensures(self, gm: GraphModule) -> None:
        assert not mergeable_groups(gm), "linears over one input left unmerged"
        merged = [n for n in gm.graph.nodes if n.op == "placeholder" and _kind(n) == MERGED]
        assert len(merged) == self.counters["merges"], f"{len(merged)} merged weights, {self.counters['merges']} merges"
        assert all(len(n.users) == 1 and is_call(next(iter(n.users)), aten.linear.default) for n in merged), \
            "a merged weight is read by something other than its one linear"


def mergeable_groups(gm: GraphModule) -> list[list[Node]]:
    """The groups (2 or more, in graph order) of bias-free linears over one input whose weights are
    parameters of one dtype and width that nothing else reads."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        weight = _sole_weight(node)
        if weight is not None:
            val = weight.meta["val"]
            groups.setdefault((node.args[0], val.dtype, int(val.shape[1])), []).append(node)
    return [linears for linears in groups.values() if len(linears) > 1]


def merged_name(parts: tuple[str, ...]) -> str:
    """A readable state-dict-style name: 'model.layers.0.self_attn.q_proj+k_proj+v_proj.weight'."""
    split = [part.split(".") for part in parts]
    prefix = 0
    while all(len(s) > prefix + 1 and s[prefix] == split[0][prefix] for s in split):
        prefix += 1
    suffix = 0
    while all(len(s) > prefix + suffix + 1 and s[-1 - suffix] == split[0][-1 - suffix] for s in split):
        suffix += 1
    if not suffix:                        # no shared leaf ("weight"): the full names read better
        return "+".join(parts)
    middles = [".".join(s[prefix:len(s) - suffix]) for s in split]
    return ".".join(split[0][:prefix] + ["+".join(middles)] + split[0][-suffix:])


def _sole_weight(node: Node) -> Node | None:
    """The weight placeholder of a bias-free linear, if it is a parameter nothing else reads."""
    if not is_call(node, aten.linear.default) or not isinstance(node.args[0], Node):
        return None
    if (len(node.args) > 2 and node.args[2] is not None) or node.kwargs.get("bias") is not None:
        return None
    weight = node.args[1]
    if not (isinstance(weight, Node) and weight.op == "placeholder" and _kind(weight) == "parameter"
            and len(weight.users) == 1):
        return None
    val = weight.meta.get("val")
    return weight if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def _kind(node: Node) -> str | None:
    fact = node.meta.get(META_KEY)
    return fact.kind if isinstance(fact, WeightInput) else None


def _set_vals(parts: list[Node], weight: Node, merged: Node, outputs: list[Node]) -> None:
    """Shape facts of the new nodes, computed on the parts' fake tensors (symbolic batch kept).

    Inside the capture's own fake mode: torch 2.11 (the GPU machine's) refuses an aten op on fake
    tensors with symbolic sizes outside it ("Cannot call numel() on tensor with symbolic
    sizes"), which 2.13 tolerates."""
    x_val = merged.args[0].meta.get("val")
    vals = [p.meta["val"] for p in parts] + ([x_val] if isinstance(x_val, torch.Tensor) else [])
    mode = detect_fake_mode(vals)
    with torch.no_grad(), (mode if mode is not None else contextlib.nullcontext()):
        weight.meta["val"] = torch.cat([p.meta["val"] for p in parts])
        if not isinstance(x_val, torch.Tensor):
            return
        merged.meta["val"] = aten.linear.default(x_val, weight.meta["val"])
        for output in outputs:
            output.meta["val"] = aten.slice.Tensor(merged.meta["val"], *output.args[1:])


def _common_stack(linears: list[Node]) -> dict:
    """The module scopes every linear sits in (a layer's self_attn, its mlp): the merged GEMM's."""
    stacks = [list((n.meta.get("nn_module_stack") or {}).items()) for n in linears]
    common = []
    for entries in zip(*stacks):
        if any(entry != entries[0] for entry in entries):
            break
        common.append(entries[0])
    return dict(common)

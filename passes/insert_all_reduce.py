"""Tensor-parallel plans: `specontext::all_reduce` after each row-parallel projection.

With Megatron-style tensor parallelism every rank holds a slice of the attention's output
projection (o_proj: its query heads' columns) and of the MLP's down projection (its share of the
MLP width), so each of those linears yields a partial sum that the ranks add up before the
residual add. The rest of the graph runs unchanged on a rank's slices: the captured views infer
the head count (-1), and the specontext:: attention ops take the rank's heads from their inputs.

Requires: the graph's linears name their weights (capture's WeightInput facts); a row-parallel
          linear has no bias (every rank would add it: not supported).
Ensures:  exactly one all_reduce right after each o_proj and each down_proj linear, two per
          decoder layer, and every former reader of the linear reads the sum.
"""
from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import LINEAR_OPS, PassError, attention_sites, finish, nodes_of, placeholder_name
from specontext_compiler.runtime import ops

ROW_PARALLEL_WEIGHTS = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")


def row_parallel_linears(gm: GraphModule) -> list[Node]:
    """The linears whose weight is an attention output or an MLP down projection, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS or len(node.args) < 2:
            continue
        name = placeholder_name(node.args[1]) or ""
        if name.endswith(ROW_PARALLEL_WEIGHTS):
            if len(node.args) > 2 and node.args[2] is not None:
                raise PassError(f"InsertAllReduce: {name} has a bias; a row-parallel bias would be added once per "
                                "rank (not supported)")
            found.append(node)
    return found


class InsertAllReduce(PassBase):
    """Sum each row-parallel projection's partial output over the ranks."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if nodes_of(gm, "all_reduce"):
            raise PassError("InsertAllReduce: the graph already has all-reduces; run the pass once")
        layers = len(attention_sites(gm))
        if len(row_parallel_linears(gm)) != 2 * layers:
            raise PassError(f"InsertAllReduce: found {len(row_parallel_linears(gm))} o_proj/down_proj linears for "
                            f"{layers} decoder layers; this architecture's projections are not recognized")

    def call(self, gm: GraphModule) -> PassResult:
        for linear in row_parallel_linears(gm):
            with gm.graph.inserting_after(linear):
                summed = gm.graph.call_function(ops.op("all_reduce"), (linear,))
            summed.meta.update({k: v for k, v in linear.meta.items() if k in ("val", "nn_module_stack")})
            linear.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)
            self.counters["all_reduce"] += 1
        finish(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        reduces = nodes_of(gm, "all_reduce")
        linears = row_parallel_linears(gm)
        assert len(reduces) == len(linears) == 2 * len(attention_sites(gm))
        for linear in linears:
            assert [u.target for u in linear.users] == [ops.op("all_reduce")], "a partial sum escapes its all_reduce"

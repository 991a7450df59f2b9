"""Rewrite each dense attention into sparse attention over the retrieved rows (paper s.4-5).

`specontext::attention(q, k, v, layer, scaling)` becomes
`specontext::sparse_attention(q, k, v, indices, layer, scaling)`, where indices is the retrieval
head's output. The op appends the new k/v to the runtime's KV store and attends over the selected
rows plus sinks, the recent window and the new token; prefill (T > 1) stays dense inside the op.
Budget, sink and recent sizes are plan parameters (plan.json's workload) that the runtime reads;
the graph does not carry them.

Sliding-window layers (`window_layers`) keep their dense attention: each token sees only its
window, which the runtime applies, so they need no selection.

Requires: FindAttention and InsertRetrievalHead ran (annotated attention, one retrieve node).
Ensures:  dense attention remains only in window layers; one sparse attention per other layer.
"""
from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import (META_KEY, AttentionSite, PassError, SparseAttentionSite, finish,
                                               nodes_of)
from specontext_compiler.runtime import ops


class RewriteSparseAttention(PassBase):
    """Replace every specontext::attention by specontext::sparse_attention fed by retrieve."""

    def __init__(self, window_layers=()) -> None:
        self.window_layers = frozenset(int(i) for i in window_layers)
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        attention = nodes_of(gm, "attention")
        if not attention:
            raise PassError("RewriteSparseAttention: the graph has no dense attention to rewrite")
        if any(not isinstance(n.meta.get(META_KEY), AttentionSite) for n in attention):
            raise PassError("RewriteSparseAttention: attention nodes are not annotated; run FindAttention first")
        if len(nodes_of(gm, "retrieve")) != 1:
            raise PassError("RewriteSparseAttention: needs exactly one retrieve node; run InsertRetrievalHead first")

    def call(self, gm: GraphModule) -> PassResult:
        indices = nodes_of(gm, "retrieve")[0]
        sparse_op = ops.op("sparse_attention")
        for node in nodes_of(gm, "attention"):
            q, k, v, layer, scaling = node.args[:5]
            if int(layer) in self.window_layers:
                self.counters["kept_window_attention"] += 1
                continue
            with gm.graph.inserting_before(node):
                sparse = gm.graph.call_function(sparse_op, (q, k, v, indices, layer, scaling))
            sparse.meta.update({key: value for key, value in node.meta.items() if key != META_KEY})
            sparse.meta[META_KEY] = SparseAttentionSite(node.meta[META_KEY])
            node.replace_all_uses_with(sparse)
            gm.graph.erase_node(node)
            self.counters["rewrite_sparse_attention"] += 1
        finish(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        assert all(int(n.args[3]) in self.window_layers for n in nodes_of(gm, "attention")), \
            "dense attention left after the rewrite"
        assert len(nodes_of(gm, "sparse_attention")) == self.counters["rewrite_sparse_attention"]

"""Insert the elastic prefetch of offloaded layers' KV (paper s.5, asynchronous prefetch).

For each layer the plan offloads, `prefetch_issue(indices, layer)` starts copying the selected
rows that are not already in the layer's GPU buffer; it is placed before the attention of the
layer the schedule names (0 = right after retrieve), so the copy overlaps the compute of the
layers in between. `prefetch_wait(ticket, layer)` goes right before the layer's own attention
and its output becomes that attention's `ready` argument, which orders the two in the graph.
Which layers are offloaded and when each copy is issued is decided by the ILP
(cost_models/ilp.py); this pass only places the nodes. Resident layers get no prefetch.

Requires: RewriteSparseAttention ran (sparse attention nodes, one retrieve node).
Ensures:  one issue and one wait per offloaded layer; each wait feeds its layer's attention;
          each issue comes before its wait.
"""
from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import (META_KEY, PassError, PrefetchSite, attention_sites, finish,
                                               nodes_of)
from specontext_compiler.runtime import ops


class InsertPrefetch(PassBase):
    """Place prefetch_issue / prefetch_wait pairs for the offloaded layers."""

    def __init__(self, offloaded_layers=(), schedule: dict[int, int] | None = None) -> None:
        self.offloaded_layers = sorted(set(int(x) for x in offloaded_layers))
        self.schedule = {int(k): int(v) for k, v in (schedule or {}).items()}
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if not nodes_of(gm, "sparse_attention") or len(nodes_of(gm, "retrieve")) != 1:
            raise PassError("InsertPrefetch: needs sparse attention fed by one retrieve node; "
                            "run InsertRetrievalHead and RewriteSparseAttention first")
        layers = {site.layer for site, _ in attention_sites(gm)}
        unknown = [x for x in self.offloaded_layers if x not in layers]
        if unknown:
            raise PassError(f"InsertPrefetch: offloaded layers {unknown} are not in the graph "
                            f"(layers 0..{max(layers)}); the plan was made for another model")
        late = {x: self.schedule[x] for x in self.offloaded_layers if self.schedule.get(x, 0) > x}
        if late or any(v < 0 for v in self.schedule.values()):
            raise PassError(f"InsertPrefetch: schedule {late or self.schedule} issues a copy after (or before "
                            "the start of) the step; each issue layer must be in 0..layer")

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        retrieve = nodes_of(gm, "retrieve")[0]
        by_layer = {site.layer: node for site, node in attention_sites(gm)}
        tickets = {}
        for layer in self.offloaded_layers:   # all issues first, so each wait stays next to its attention
            if layer not in self.schedule:
                self.counters["issued_after_retrieve_by_default"] += 1
            issue_before = self.schedule.get(layer, 0)
            where = graph.inserting_after(self._last_issue_after(retrieve)) if issue_before == 0 \
                else graph.inserting_before(by_layer[issue_before])
            with where:
                tickets[layer] = graph.call_function(ops.op("prefetch_issue"), (retrieve, layer))
            tickets[layer].meta[META_KEY] = PrefetchSite(layer, "issue", issue_before)
        for layer, ticket in tickets.items():
            attention = by_layer[layer]
            with graph.inserting_before(attention):
                ready = graph.call_function(ops.op("prefetch_wait"), (ticket, layer))
            ready.meta[META_KEY] = PrefetchSite(layer, "wait", ticket.meta[META_KEY].issue_before_layer)
            attention.args = tuple(attention.args[:6]) + (ready,)
            self.counters["prefetch_pairs"] += 1
        finish(gm)
        return PassResult(gm, bool(self.offloaded_layers))

    @staticmethod
    def _last_issue_after(retrieve):
        """Issues placed right after retrieve keep layer order: insert after the previous one."""
        node = retrieve
        while node.next.op == "call_function" and node.next.target is ops.op("prefetch_issue"):
            node = node.next
        return node

    def ensures(self, gm: GraphModule) -> None:
        issues, waits = nodes_of(gm, "prefetch_issue"), nodes_of(gm, "prefetch_wait")
        assert len(issues) == len(waits) == len(self.offloaded_layers), (len(issues), len(waits))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for wait in waits:
            (user,) = wait.users
            assert user.target is ops.op("sparse_attention") and user.args[4] == wait.args[1]
            assert order[wait.args[0]] < order[wait]

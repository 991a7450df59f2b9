"""Insert the retrieval head: one `specontext::retrieve(input_ids, position_ids)` per step (paper s.4).

SpeContext selects the KV rows for all layers once per decode step, from a lightweight head that
only needs the new tokens, before the LLM's first layer runs. So the node goes right before the
first node of layer 0; its output (indices [B, G, K]) feeds every layer's sparse attention.

Requires: FindAttention ran (attention sites annotated); input_ids and position_ids placeholders.
Ensures:  exactly one retrieve node, placed before every node of layer 0.
"""
from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import (META_KEY, PassError, RetrievalSite, attention_sites, finish,
                                               module_paths, nodes_of)
from specontext_compiler.runtime import ops


def first_node_of_layer(gm: GraphModule, layer_path: str) -> Node | None:
    """The first call node whose module stack enters `layer_path` (e.g. 'model.layers.0')."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(p == layer_path or p.startswith(layer_path + ".")
                                              for p in module_paths(node)):
            return node
    return None


def _layer_path(module: str, layer: int) -> str:
    """'model.layers.0.self_attn' -> 'model.layers.0'."""
    marker = f"layers.{layer}"
    return module[:module.index(marker) + len(marker)] if marker in module else module


class InsertRetrievalHead(PassBase):
    """Insert the one retrieve node before layer 0."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if not attention_sites(gm):
            raise PassError("InsertRetrievalHead: no annotated attention; run FindAttention first")
        names = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        if not {"input_ids", "position_ids"} <= names:
            raise PassError("InsertRetrievalHead: the graph needs input_ids and position_ids inputs; "
                            "capture it with capture_decode_graph")
        if nodes_of(gm, "retrieve"):
            raise PassError("InsertRetrievalHead: the graph already has a retrieve node; run the pass once")

    def call(self, gm: GraphModule) -> PassResult:
        sites = attention_sites(gm)
        first_site, first_attention = sites[0]
        anchor = first_node_of_layer(gm, _layer_path(first_site.module, first_site.layer)) or first_attention
        inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        with gm.graph.inserting_before(anchor):
            node = gm.graph.call_function(ops.op("retrieve"), (inputs["input_ids"], inputs["position_ids"]))
        node.meta[META_KEY] = RetrievalSite(tuple(site.layer for site, _ in sites))
        self.counters["retrieve_nodes"] += 1
        finish(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        retrieves = nodes_of(gm, "retrieve")
        assert len(retrieves) == 1, f"expected one retrieve node, found {len(retrieves)}"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        site, attention = attention_sites(gm)[0]
        assert order[retrieves[0]] < order[attention], "retrieve must run before layer 0's attention"

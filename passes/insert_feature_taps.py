"""Tap the LLM's hidden states for a fused retrieval head: `specontext::record_features` per feature layer.

A fused head (EAGLE-3 style) projects each token from its embedding and from the LLM's hidden
states at the previous position, taken where they enter the decoder layers `feature_layers`
(HF's output_hidden_states[i]; 0 = the embedding output). This pass finds each of those
residual-stream tensors in the exported graph (by the nn_module_stack naming `layers.N`) and hands
it to the runtime with `record_features(hidden, block)`, block being its place in feature_layers.

A tap's only effect is on the runtime's buffers, so nothing reads its output; the op is declared
effectful (runtime/ops.py) so that dead-code elimination keeps it, and the emitted decode graph
runs it in graph order. Each tap comes after the retrieve node: a decode step's retrieve reads the
previous step's features, which the taps then overwrite.

Requires: InsertRetrievalHead ran (one retrieve node); each feature layer is a decoder layer of the graph.
Ensures:  one tap per feature layer, after retrieve, reading a [B, T, hidden] tensor from outside
          its layer. No feature layers (a plain head): the graph is left unchanged.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from specontext_compiler.passes.common import (META_KEY, PassError, attention_sites, finish, layer_of_path,
                                               module_paths, nodes_of)
from specontext_compiler.runtime import ops


@dataclass(frozen=True)
class FeatureTap:
    """One record_features node: the hidden state entering `layer`, block `block` of the head's features."""

    layer: int
    block: int


def nodes_in_layer(gm: GraphModule, layer: int) -> list[Node]:
    """The call nodes computed inside decoder layer `layer` (its nn_module_stack names layers.N), in order."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and any(layer_of_path(path) == layer for path in module_paths(n))]


def hidden_width(gm: GraphModule) -> int:
    """The residual stream's width: the last dimension of the token embedding lookup."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.target is torch.ops.aten.embedding.default and isinstance(val, torch.Tensor):
            return int(val.shape[-1])
    raise PassError("InsertFeatureTaps: no token embedding lookup (aten.embedding) in the graph; "
                    "cannot tell the hidden size")


def _is_hidden(node: Node, width: int) -> bool:
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dim() == 3
            and isinstance(val.shape[-1], int) and val.shape[-1] == width)


def residual_into(gm: GraphModule, layer: int, width: int) -> Node | None:
    """The hidden state [B, T, width] entering decoder `layer`: the first one its nodes read from outside it."""
    inside = nodes_in_layer(gm, layer)
    members = set(inside)
    for node in inside:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "placeholder" and _is_hidden(arg, width):
                return arg
    return None


class InsertFeatureTaps(PassBase):
    """Insert record_features on the residual stream entering each of a fused head's feature layers."""

    def __init__(self, feature_layers: Iterable[int] = ()) -> None:
        self.feature_layers = tuple(int(i) for i in feature_layers)
        self.counters: Counter = Counter()

    def requires(self, gm: GraphModule) -> None:
        if not self.feature_layers:
            return
        if len(nodes_of(gm, "retrieve")) != 1:
            raise PassError("InsertFeatureTaps: needs the one retrieve node; run InsertRetrievalHead first")
        if nodes_of(gm, "record_features"):
            raise PassError("InsertFeatureTaps: the graph already has feature taps; run the pass once")
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise PassError(f"InsertFeatureTaps: feature layers {list(self.feature_layers)} repeat a layer")
        layers = sorted(site.layer for site, _ in attention_sites(gm))
        unknown = [i for i in self.feature_layers if i not in layers]
        if unknown:
            raise PassError(f"InsertFeatureTaps: the head reads hidden states entering layers {unknown}, the graph "
                            f"has layers {layers[0]}..{layers[-1]}; the head was made for another model")

    def call(self, gm: GraphModule) -> PassResult:
        if not self.feature_layers:
            return PassResult(gm, False)
        width = hidden_width(gm)
        retrieve = nodes_of(gm, "retrieve")[0]
        for block, layer in enumerate(self.feature_layers):
            hidden = residual_into(gm, layer, width)
            if hidden is None:
                raise PassError(f"InsertFeatureTaps: found no [batch, tokens, {width}] hidden state entering "
                                f"layer {layer}; this architecture's residual stream is not recognized")
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            with gm.graph.inserting_after(max(hidden, retrieve, key=order.__getitem__)):
                tap = gm.graph.call_function(ops.op("record_features"), (hidden, block))
            tap.meta[META_KEY] = FeatureTap(layer, block)
            self.counters["feature_taps"] += 1
        finish(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        taps = nodes_of(gm, "record_features")
        assert len(taps) == len(self.feature_layers), f"expected {len(self.feature_layers)} taps, found {len(taps)}"
        if not taps:
            return
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        retrieve = nodes_of(gm, "retrieve")[0]
        for tap in taps:
            fact = tap.meta[META_KEY]
            assert order[retrieve] < order[tap], "a feature tap must run after retrieve has read the last step's"
            assert self.feature_layers[fact.block] == fact.layer and tap.args[1] == fact.block
            assert tap.args[0] not in set(nodes_in_layer(gm, fact.layer)), "a tap reads its layer's input"

import pytest
import torch

from specontext_compiler.codegen.emit_graph import emit_graph_source
from specontext_compiler.passes.common import META_KEY, PassError, module_paths, nodes_of
from specontext_compiler.passes.insert_feature_taps import FeatureTap, InsertFeatureTaps, nodes_in_layer


def _layer_of_producer(node) -> str:
    return module_paths(node)[-1] if module_paths(node) else ""


@pytest.mark.parametrize("feature_layers", [(0, 2), (2, 1)])
def test_one_tap_per_feature_layer_on_the_stream_entering_it(with_retrieve, feature_layers):
    gm = with_retrieve.graph_module
    InsertFeatureTaps(feature_layers)(gm)
    taps = nodes_of(gm, "record_features")
    assert {t.meta[META_KEY] for t in taps} == {FeatureTap(layer, block) for block, layer in enumerate(feature_layers)}
    assert len(taps) == len(feature_layers)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (retrieve,) = nodes_of(gm, "retrieve")
    for tap in taps:
        layer, hidden = tap.meta[META_KEY].layer, tap.args[0]
        assert tap.args[1] == feature_layers.index(layer) and order[retrieve] < order[tap]
        # entering layer 0: the embedding; entering layer i: layer i-1's residual add
        if layer == 0:
            assert hidden.target is torch.ops.aten.embedding.default
        else:
            assert hidden.target is torch.ops.aten.add.Tensor
            assert _layer_of_producer(hidden) == f"model.layers.{layer - 1}"
        assert tuple(hidden.meta["val"].shape[-1:]) == (64,)
        assert hidden in {a for n in nodes_in_layer(gm, layer) for a in n.all_input_nodes}


def test_plain_head_gets_no_taps(with_retrieve):
    gm = with_retrieve.graph_module
    before = len(gm.graph.nodes)
    result = InsertFeatureTaps(())(gm)
    assert not result.modified and not nodes_of(gm, "record_features") and len(gm.graph.nodes) == before


def test_taps_survive_dead_code_elimination_and_codegen(rewritten):
    gm = rewritten.graph_module
    InsertFeatureTaps((1,))(gm)
    gm.graph.eliminate_dead_code()     # nothing reads a tap's output; the op is declared effectful
    assert len(nodes_of(gm, "record_features")) == 1
    source, record = emit_graph_source(gm)
    assert record["op_counts"]["specontext.record_features.default"] == 1
    assert "torch.ops.specontext.record_features.default(" in source


def test_refuses_layers_the_graph_lacks(with_retrieve):
    with pytest.raises(PassError, match=r"layers \[3\].*layers 0..2"):
        InsertFeatureTaps((0, 3))(with_retrieve.graph_module)


def test_refuses_a_graph_without_retrieve(annotated):
    with pytest.raises(PassError, match="InsertRetrievalHead"):
        InsertFeatureTaps((1,))(annotated.graph_module)

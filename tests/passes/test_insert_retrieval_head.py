import pytest

from specontext_compiler.passes.common import META_KEY, PassError, RetrievalSite, attention_sites, nodes_of
from specontext_compiler.passes.insert_retrieval_head import InsertRetrievalHead


def test_one_retrieve_before_layer_zero(annotated):
    gm = annotated.graph_module
    InsertRetrievalHead()(gm)
    gm.graph.lint()
    (node,) = nodes_of(gm, "retrieve")
    assert [a.name for a in node.args] == ["input_ids", "position_ids"]
    assert node.meta[META_KEY] == RetrievalSite((0, 1, 2))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer0 = [n for n in gm.graph.nodes if any(".layers.0" in v[0] for v in n.meta.get("nn_module_stack", {}).values())]
    assert layer0 and order[node] < min(order[n] for n in layer0)
    # before the first layer's attention, after the embedding lookup that starts the forward
    assert order[node] < order[attention_sites(gm)[0][1]]


def test_refuses_unannotated_graph(captured):
    with pytest.raises(PassError, match="FindAttention"):
        InsertRetrievalHead()(captured.graph_module)


def test_refuses_second_run(with_retrieve):
    with pytest.raises(PassError, match="once"):
        InsertRetrievalHead()(with_retrieve.graph_module)

import pytest

from specontext_compiler.passes.common import META_KEY, PassError, SparseAttentionSite, attention_sites, nodes_of
from specontext_compiler.passes.rewrite_sparse_attention import RewriteSparseAttention


def test_every_attention_becomes_sparse(with_retrieve):
    gm = with_retrieve.graph_module
    rewrite = RewriteSparseAttention()
    rewrite(gm)
    gm.graph.lint()
    assert not nodes_of(gm, "attention")
    sparse = nodes_of(gm, "sparse_attention")
    (retrieve,) = nodes_of(gm, "retrieve")
    assert len(sparse) == 3 and rewrite.counters["rewrite_sparse_attention"] == 3
    for layer, node in enumerate(sparse):
        assert node.args[3] is retrieve and node.args[4] == layer and len(node.args) == 6
        fact = node.meta[META_KEY]
        assert isinstance(fact, SparseAttentionSite)
        assert fact.site.layer == layer
    assert [s.layer for s, _ in attention_sites(gm)] == [0, 1, 2]


def test_refuses_graph_without_retrieve(annotated):
    with pytest.raises(PassError, match="InsertRetrievalHead"):
        RewriteSparseAttention()(annotated.graph_module)

import pytest

from specontext_compiler.passes.common import META_KEY, PassError, PrefetchSite, nodes_of
from specontext_compiler.passes.insert_prefetch import InsertPrefetch


def test_issue_and_wait_per_offloaded_layer(rewritten):
    gm = rewritten.graph_module
    pass_ = InsertPrefetch(offloaded_layers=[1, 2], schedule={1: 0, 2: 1})
    pass_(gm)
    gm.graph.lint()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (retrieve,) = nodes_of(gm, "retrieve")
    sparse = nodes_of(gm, "sparse_attention")
    issues = {n.args[1]: n for n in nodes_of(gm, "prefetch_issue")}
    waits = {n.args[1]: n for n in nodes_of(gm, "prefetch_wait")}
    assert sorted(issues) == sorted(waits) == [1, 2] and pass_.counters["prefetch_pairs"] == 2
    assert len(sparse[0].args) == 6                    # layer 0 is resident: no ready input
    for layer in (1, 2):
        assert sparse[layer].args[6] is waits[layer] and waits[layer].args[0] is issues[layer]
        assert order[waits[layer]] == order[sparse[layer]] - 1
        assert issues[layer].args[0] is retrieve
    assert retrieve.next is issues[1]                   # schedule 0: right after retrieve
    assert order[sparse[0]] < order[issues[2]] < order[sparse[1]]   # schedule 1: before layer 1's attention
    assert issues[2].meta[META_KEY] == PrefetchSite(2, "issue", 1)


def test_no_offload_inserts_nothing(rewritten):
    gm = rewritten.graph_module
    before = len(gm.graph.nodes)
    InsertPrefetch()(gm)
    assert len(gm.graph.nodes) == before and not nodes_of(gm, "prefetch_issue")


@pytest.mark.parametrize("layers, schedule, match", [([7], {}, "not in the graph"), ([1], {1: 2}, "after")])
def test_refuses_bad_plan(rewritten, layers, schedule, match):
    with pytest.raises(PassError, match=match):
        InsertPrefetch(layers, schedule)(rewritten.graph_module)


def test_refuses_dense_graph(annotated):
    with pytest.raises(PassError, match="RewriteSparseAttention"):
        InsertPrefetch([1], {1: 0})(annotated.graph_module)

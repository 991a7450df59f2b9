import pytest

from specontext_compiler.passes.common import PassError, count_ops
from specontext_compiler.pipeline import run_pipeline


def test_runs_every_pass_in_order_and_records_counters(captured):
    seen = []
    gm, records = run_pipeline(captured.graph_module, [2], {2: 1}, progress=lambda name, s: seen.append(name))
    gm.graph.lint()
    names = ["CleanCapture", "FindAttention", "InsertRetrievalHead", "InsertFeatureTaps", "RewriteSparseAttention",
             "InsertPrefetch", "MergeProjections", "FuseElementwise"]
    assert seen == names and [r["pass"] for r in records] == names + ["summary"]
    assert all(r["seconds"] >= 0 for r in records)
    counts = count_ops(gm)
    assert records[-1]["counters"] == {k: v for k, v in counts.items() if k.startswith("specontext.")}
    assert counts["specontext.sparse_attention.default"] == 3 and counts["specontext.retrieve.default"] == 1
    assert counts["specontext.prefetch_issue.default"] == counts["specontext.prefetch_wait.default"] == 1
    assert records[4]["counters"]["rewrite_sparse_attention"] == 3
    # a plain head (no feature layers): the tap pass runs and leaves the graph alone
    assert records[3]["counters"] == {} and "specontext.record_features.default" not in counts


def test_error_names_the_passes_before(captured):
    with pytest.raises(PassError, match=r"InsertPrefetch.*after CleanCapture, FindAttention"):
        run_pipeline(captured.graph_module, [9], {9: 0})

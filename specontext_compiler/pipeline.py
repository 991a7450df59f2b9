"""The pass pipeline: the captured graph -> the SpeContext decode graph, in one literal list.

Each pass is a torch.fx PassBase (requires -> call -> ensures). The runner below stays outside
the passes (as TVM's instruments do): it lints the graph after each pass, times it, collects its
counters, and prefixes a PassError with the passes that ran before it.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from torch.fx import GraphModule

from specontext_compiler.passes.clean_capture import CleanCapture
from specontext_compiler.passes.common import PassError, count_ops
from specontext_compiler.passes.insert_all_reduce import InsertAllReduce
from specontext_compiler.passes.find_attention import FindAttention
from specontext_compiler.passes.fuse_elementwise import FuseElementwise
from specontext_compiler.passes.insert_feature_taps import InsertFeatureTaps
from specontext_compiler.passes.insert_prefetch import InsertPrefetch
from specontext_compiler.passes.insert_retrieval_head import InsertRetrievalHead
from specontext_compiler.passes.merge_projections import MergeProjections
from specontext_compiler.passes.rewrite_sparse_attention import RewriteSparseAttention

Progress = Callable[[str, float], None]


def build_passes(offloaded_layers: Iterable[int], schedule: dict[int, int], *,
                 feature_layers: Iterable[int] = (), window_layers: Iterable[int] = (),
                 tensor_parallel: bool = False, fuse: bool = True) -> list:
    """The pipeline, in order (feature_layers: a fused head's; none for a plain head;
    window_layers: sliding-window layers, which stay dense; tensor_parallel: a plan over several
    GPUs, whose row-parallel projections are summed over the ranks; fuse: the projection merge and
    the elementwise fusion, last, so that the passes before them match the captured aten nodes; a
    tensor-parallel plan is not merged, as its runtime shards each weight by its own name)."""
    return [
        CleanCapture(),
        FindAttention(),
        InsertRetrievalHead(),
        InsertFeatureTaps(feature_layers),
        RewriteSparseAttention(window_layers),
        InsertPrefetch(offloaded_layers, schedule),
        *([InsertAllReduce()] if tensor_parallel else []),
        *([MergeProjections()] if fuse and not tensor_parallel else []),
        *([FuseElementwise()] if fuse else []),
    ]


def run_pipeline(gm: GraphModule, offloaded_layers: Iterable[int] = (), schedule: dict[int, int] | None = None,
                 progress: Progress | None = None, feature_layers: Iterable[int] = (),
                 window_layers: Iterable[int] = (), tensor_parallel: bool = False,
                 fuse: bool = True) -> tuple[GraphModule, list[dict]]:
    """Run every pass on gm; returns the graph and [{pass, seconds, counters, nodes}] per pass.

    offloaded_layers: layers whose KV lives in host memory; schedule: {layer: issue_before_layer};
    feature_layers: the hidden states a fused retrieval head reads (taps inserted for them).
    """
    records, done = [], []
    for graph_pass in build_passes(offloaded_layers, schedule or {}, feature_layers=feature_layers,
                                   window_layers=window_layers, tensor_parallel=tensor_parallel, fuse=fuse):
        name = type(graph_pass).__name__
        start = time.perf_counter()
        try:
            result = graph_pass(gm)
        except PassError as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"{exc}{after}") from None
        gm = result.graph_module if result is not None else gm
        gm.graph.lint()
        seconds = time.perf_counter() - start
        records.append({"pass": name, "seconds": round(seconds, 4), "counters": dict(graph_pass.counters),
                        "nodes": len(gm.graph.nodes)})
        done.append(name)
        if progress is not None:
            progress(name, seconds)
    records.append({"pass": "summary", "seconds": round(sum(r["seconds"] for r in records), 4),
                    "counters": {k: v for k, v in count_ops(gm).items() if k.startswith("specontext.")},
                    "nodes": len(gm.graph.nodes)})
    return gm, records

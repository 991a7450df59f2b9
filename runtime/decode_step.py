"""One decode step over all request slots, replayed from a CUDA graph on the GPU.

HF eager decoding is launch-bound (68 ms a step at batch 1 on an H100 for 8k-128k context), so
the whole step (retrieval, prefetch issue/wait on the copy stream, every layer) is captured once
per residency and replayed: the step time then follows bytes moved, not kernel launches.
begin()/end() of the step context stay outside the graph: they only move scalars between
persistent buffers that the captured kernels read.
"""
from __future__ import annotations

import torch


class DecodeStep:
    """Runs forward(input_ids [S,1], position_ids [S,1]) -> logits, captured when on CUDA."""

    def __init__(self, forward, ctx, use_cuda_graph: bool):
        self.forward = forward
        self.ctx = ctx
        self.use_cuda_graph = use_cuda_graph
        self.graph = None
        self.captures = 0

    def invalidate(self) -> None:
        """Residency changed (tensors moved): the next step captures a new graph."""
        self.graph = None

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.ctx.begin(input_ids, position_ids)
        if not self.use_cuda_graph:
            logits = self.forward(input_ids, position_ids)
        else:
            if self.graph is None:
                self._capture(input_ids, position_ids)
            self.static_ids.copy_(input_ids)
            self.static_pos.copy_(position_ids)
            self.graph.replay()
            logits = self.static_logits
        self.ctx.end()
        return logits

    def _capture(self, input_ids, position_ids) -> None:
        self.static_ids = input_ids.clone()
        self.static_pos = position_ids.clone()
        saved = [t.clone() for t in self._restored_after_warm_up()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):       # warm-up: allocator, Triton compilation, cuBLAS handles
            for _ in range(2):
                self.ctx.begin(self.static_ids, self.static_pos)
                self.forward(self.static_ids, self.static_pos)
        torch.cuda.current_stream().wait_stream(side)
        self.ctx.begin(self.static_ids, self.static_pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_logits = self.forward(self.static_ids, self.static_pos)
        for live, before in zip(self._restored_after_warm_up(), saved):
            live.copy_(before)
        self.graph = graph
        self.captures += 1

    def _restored_after_warm_up(self):
        """State the warm-up runs change that the first replay must see unchanged.

        Warm-up loads are not part of the statistics; a fused head's features are read, then
        overwritten by each step, so after a warm-up they would hold this step's, not the last one's.
        """
        fetcher = self.ctx.prefetcher
        features = [self.ctx.features.last] if self.ctx.features is not None else []
        return [fetcher.rows_loaded, fetcher.rows_requested, *features]

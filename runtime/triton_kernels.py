"""The Triton kernels behind the step context on CUDA (runtime/kernels/, or a plan's specialized copies).

Each method has the signature the step context calls; the plan's generated kernel files
(plan_dir/kernels/*.py, checked against their sha256) are used when given, the packaged
templates otherwise.
"""
from __future__ import annotations

import importlib

FAMILIES = ("retrieval_scores", "sparse_decode", "elastic_load", "kv_append")


class TritonKernels:
    """Kernel launchers for one engine."""

    def __init__(self, modules: dict | None = None):
        modules = dict(modules or {})
        for family in FAMILIES:
            if family not in modules:
                modules[family] = importlib.import_module(f"specontext_compiler.runtime.kernels.{family}")
        self.modules = modules

    def group_scores(self, q, head_k, starts, scaling, groups):
        """[B, G, S_max] fp32 per-group attention weights of the retrieval head."""
        return self.modules["retrieval_scores"].retrieval_scores(q, head_k, starts, scaling, groups)

    def select(self, scores, starts, config):
        """int32 [B, G, W] selected positions (sinks and recent window forced)."""
        return self.modules["retrieval_scores"].select(scores, starts, config.budget, config.sink_tokens,
                                                       config.recent_tokens)

    def append(self, cache_k, cache_v, k, v, starts):
        self.modules["kv_append"].kv_append(cache_k, cache_v, k, v, starts)

    def append_one(self, cache_k, k, starts):
        self.modules["kv_append"].kv_append(cache_k, None, k, None, starts)

    def sparse_decode(self, q, k_src, v_src, rows, k_new, v_new, scaling):
        return self.modules["sparse_decode"].sparse_decode(q, k_src, v_src, rows.int(), k_new, v_new, scaling)

    def elastic_diff(self, slot_pos, new_idx):
        return self.modules["elastic_load"].elastic_diff(slot_pos, new_idx)

    def gather_rows(self, host_k, host_v, buf_k, buf_v, load_pos, load_slot):
        self.modules["elastic_load"].gather_rows(host_k, host_v, buf_k, buf_v, load_pos, load_slot)

    def buffer_indices(self, slot_pos):
        return self.modules["elastic_load"].buffer_indices(slot_pos)

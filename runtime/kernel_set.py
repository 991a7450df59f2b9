"""The kernels the step context calls: Triton launchers on CUDA, their PyTorch references on CPU.

One KernelSet serves both devices, so the step context and the prefetcher have a single code path:
`reference=True` picks each family's `<name>_reference` (the specification the kernel tests
compare against); otherwise the launchers, from the plan's specialized files (plan_dir/kernels/,
sha256-checked) when given, else the packaged templates. The elastic diff and its
compaction, the top-k selection and buffer_indices are plain torch ops in both cases.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from specontext_compiler.runtime.caller import caller_stacklevel
from specontext_compiler.runtime.kernels._common import DTYPES

FAMILIES = ("retrieval_scores", "sparse_decode", "elastic_load", "kv_append")


class KernelSet:
    """Kernel functions for one engine, with the signatures the step context uses."""

    def __init__(self, modules: dict | None = None, reference: bool = False):
        modules = dict(modules or {})
        for family in FAMILIES:
            if family not in modules:
                modules[family] = importlib.import_module(f"specontext_compiler.runtime.kernels.{family}")
        self.modules = modules
        self.reference = reference

    def _fn(self, family: str, name: str):
        return getattr(self.modules[family], f"{name}_reference" if self.reference else name)

    def group_scores(self, q, head_k, starts, scaling, groups):
        """[B, G, S_max] fp32 per-group attention weights of the retrieval head."""
        return self._fn("retrieval_scores", "retrieval_scores")(q, head_k, starts, scaling, groups)

    def select(self, scores, starts, config):
        """int32 [B, G, W] selected positions (sinks and recent window forced)."""
        return self.modules["retrieval_scores"].select(scores, starts, config.budget, config.sink_tokens,
                                                       config.recent_tokens)

    def append(self, cache_k, cache_v, k, v, starts):
        self._fn("kv_append", "kv_append")(cache_k, cache_v, k, v, starts)

    def append_one(self, cache_k, k, starts):
        self._fn("kv_append", "kv_append")(cache_k, None, k, None, starts)

    def sparse_decode(self, q, k_src, v_src, rows, k_new, v_new, scaling):
        return self._fn("sparse_decode", "sparse_decode")(q, k_src, v_src, rows.int(), k_new, v_new, scaling)

    def elastic_diff(self, slot_pos, new_idx):
        return self.modules["elastic_load"].elastic_diff(slot_pos, new_idx)

    def compact_loads(self, load_pos, load_slot):
        return self.modules["elastic_load"].compact_loads(load_pos, load_slot)

    def gather_compact(self, host_k, host_v, buf_k, buf_v, loads, groups, programs: int | None = None):
        """programs: the Triton grid for this copy (None: the kernel's default); the reference ignores it."""
        fn = self._fn("elastic_load", "gather_compact")
        if programs is None or self.reference:
            fn(host_k, host_v, buf_k, buf_v, loads, groups)
        else:
            fn(host_k, host_v, buf_k, buf_v, loads, groups, programs=programs)

    def buffer_indices(self, slot_pos):
        return self.modules["elastic_load"].buffer_indices(slot_pos)


def kernels_for(device: torch.device, plan=None, dtype: torch.dtype | None = None) -> KernelSet:
    """Triton launchers on CUDA (the plan's specialized files if it has them), references on CPU.

    A plan's files are specialized to its dtype (bfloat16); an engine bound with another dtype
    (e.g. float32 to debug) gets the packaged, unspecialized kernels instead, with a warning.
    """
    if device.type != "cuda":
        return KernelSet(reference=True)
    modules = None
    if plan is not None and plan.kernels and plan.directory is not None:
        planned = plan.workload.dtype
        if dtype is not None and planned and DTYPES.get(planned) != dtype:
            warnings.warn(f"plan {plan.directory} has kernels specialized to {planned}; the engine runs in "
                          f"{str(dtype).removeprefix('torch.')}, so it uses the packaged generic kernels "
                          "(bind with its dtype to use the plan's)", stacklevel=caller_stacklevel())
            return KernelSet()
        from specontext_compiler.runtime.kernel_loader import load_plan_kernels
        modules = load_plan_kernels(plan.directory, plan.kernels)
    return KernelSet(modules)

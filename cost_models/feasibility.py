"""Does a workload fit a target at all, and if not, what is the smallest change that would?

Closed-form checks on memory.py's functions (no solver): every GPU term grows with the length,
so a plan fits every segment iff it fits at max_len with the fewest offloaded layers that fit
there. Used to reject impossible workloads with a one-line reason before the ILP runs, and to
bound the batch search.
"""
from dataclasses import replace

from specontext_compiler.cost_models import memory
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import Target, list_targets, load_target
from specontext_compiler.cost_models.workload import Workload

BATCH_LIMIT = 1 << 16


def _length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _offloaded_needed(spec, workload, target) -> int | None:
    """Fewest offloaded layers that fit the GPU (or the unified pool) at max_len."""
    return memory.min_offloaded_layers(spec, workload, target.gpu_memory_bytes, workload.max_len,
                                       target.unified_memory, workload.max_len)


def _host_fits(spec, workload, target, num_offloaded: int) -> bool:
    if target.unified_memory:
        return True   # already charged to the shared pool
    pinned = memory.host_bytes(spec, workload, num_offloaded, workload.max_len)
    return pinned <= memory.pinnable_host_bytes(target.host_memory_bytes, workload.gpus)


def fits(spec: ModelSpec, workload: Workload, target: Target) -> bool:
    """True if some residency plan fits the target's GPU and host memory at workload.batch."""
    needed = _offloaded_needed(spec, workload, target)
    return needed is not None and _host_fits(spec, workload, target, needed)


def max_feasible_batch(spec: ModelSpec, workload: Workload, target: Target) -> int:
    """Largest batch that fits (0 if not even one request does); feasibility is monotone in R."""
    if not fits(spec, replace(workload, batch=1), target):
        return 0
    low, high = 1, 2
    while high <= BATCH_LIMIT and fits(spec, replace(workload, batch=high), target):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(spec, replace(workload, batch=mid), target) else (low, mid)
    return low


def _largest_budget(spec, workload, target) -> int:
    """Largest budget (tokens) that fits at workload.batch, 0 if none."""
    low, high = 0, workload.budget
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(spec, replace(workload, budget=mid), target) else (low, mid)
    return low


def _smallest_change(spec, workload, target) -> str:
    """The fix to print: a smaller batch, else a smaller budget, else a built-in target that fits."""
    batch = max_feasible_batch(spec, workload, target)
    if batch >= 1:
        return f"use --batch {batch} or less"
    budget = _largest_budget(spec, workload, target)
    if budget >= 1:
        return f"use --budget {budget} or less"
    roomy = [load_target(n) for n in list_targets()]
    for other in sorted(roomy, key=lambda t: t.gpu_memory_bytes):
        if fits(spec, workload, other):
            return f"use --target {other.name} or a shorter --max-len"
    return "no built-in target fits; use a shorter --max-len"


def infeasibility_message(spec: ModelSpec, workload: Workload, target: Target) -> str | None:
    """One line naming what does not fit and the smallest change that would; None if it fits."""
    where = f"at batch {workload.batch}, {_length(workload.max_len)}"
    needed = _offloaded_needed(spec, workload, target)
    if needed is None:
        L, S = spec.num_layers, workload.max_len
        parts = {"weights": memory.weight_bytes(spec) + memory.head_weight_bytes(spec, workload),
                 "head K cache + workspace": memory.head_k_cache_bytes(spec, workload, S)
                 + memory.workspace_bytes(spec, workload, S)}
        if target.unified_memory:   # the cheapest plan keeps every layer resident: offloading frees nothing
            parts["KV cache"], how = memory.resident_kv_bytes(spec, workload, L, S), "in its shared pool"
        else:
            parts["budget buffers"], how = memory.budget_buffer_bytes(spec, workload, L), "with every layer offloaded"
        need = sum(parts.values())
        detail = " + ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
        return (f"{detail} = {need / 1e9:.1f} GB {where} {how}; "
                f"{target.name} has {target.gpu_memory_bytes / 1e9:.1f} GB; "
                f"{_smallest_change(spec, workload, target)}")
    if not _host_fits(spec, workload, target, needed):
        pinned = memory.host_bytes(spec, workload, needed, workload.max_len)
        allowed = memory.pinnable_host_bytes(target.host_memory_bytes, workload.gpus)
        return (f"offloaded KV of {needed} layers needs {pinned / 1e9:.1f} GB of pinned host memory "
                f"{where}; {target.name} allows {allowed / 1e9:.1f} GB "
                f"({memory.PINNABLE_HOST_FRACTION:.0%} of {target.host_memory_bytes / 1e9:.1f} GB"
                f"{f' shared by {workload.gpus} ranks' if workload.gpus > 1 else ''}); "
                f"{_smallest_change(spec, workload, target)}")
    return None

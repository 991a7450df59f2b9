"""A tensor-parallel plan's checks and record: does --gpus N fit, which N would, and what plan.json says.

The arithmetic lives in tensor_parallel.py; here it meets the feasibility checks (one rank must fit
its GPU and its share of the pinned host memory at batch 1) and becomes the plan's record.
"""
from dataclasses import dataclass, replace

from specontext_compiler.cost_models import latency, memory, tensor_parallel as tp
from specontext_compiler.cost_models.feasibility import fits, infeasibility_message
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import Target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import InfeasiblePlanError

LAYOUT = ("Megatron-LM tensor parallelism: q/k/v and gate/up column-parallel, o and down row-parallel, "
          "one all-reduce after the attention and one after the MLP; embedding, LM head and norms replicated")


@dataclass(frozen=True)
class RankView:
    """The model and workload one rank plans for (the whole model when gpus is 1)."""

    spec: ModelSpec
    workload: Workload


def rank_view(spec: ModelSpec, workload: Workload, level: str) -> RankView:
    return RankView(tp.rank_spec(spec, workload.gpus), tp.rank_workload(spec, workload, level))


def _fits_with(spec: ModelSpec, workload: Workload, target: Target, level: str, gpus: int) -> bool:
    """True when gpus ranks split the model and one rank fits at batch 1."""
    if tp.split_problem(spec, gpus) or (gpus > 1 and target.nvlink_gbps is None):
        return False
    view = rank_view(spec, replace(workload, batch=1, gpus=gpus), level)
    return fits(view.spec, view.workload, target)


def smallest_gpus_that_fit(spec: ModelSpec, workload: Workload, target: Target, level: str) -> int | None:
    """The fewest GPUs of one machine (up to MAX_GPUS_PER_MACHINE) whose ranks fit at batch 1."""
    for gpus in range(1, tp.MAX_GPUS_PER_MACHINE + 1):
        if _fits_with(spec, workload, target, level, gpus):
            return gpus
    return None


def _fix(spec: ModelSpec, workload: Workload, target: Target, level: str) -> str:
    smallest = smallest_gpus_that_fit(spec, workload, target, level)
    if smallest is None:
        return f"no --gpus up to {tp.MAX_GPUS_PER_MACHINE} fits {target.name}; use a shorter --max-len"
    return f"the smallest --gpus that fits is {smallest}"


def check_gpus(spec: ModelSpec, workload: Workload, target: Target, level: str) -> None:
    """Raise InfeasiblePlanError (one line, naming the smallest N that fits) when --gpus N cannot work.

    A batch too large for N that fits at batch 1 is left to the planner's own message (it names
    the largest batch); a single GPU too small names the smallest N only when some N fits."""
    gpus = workload.gpus
    if gpus > tp.MAX_GPUS_PER_MACHINE:
        raise InfeasiblePlanError(f"--gpus {gpus}: plans span one machine of at most {tp.MAX_GPUS_PER_MACHINE} "
                                  f"GPUs; {_fix(spec, workload, target, level)}")
    problem = tp.split_problem(spec, gpus)
    if problem:
        raise InfeasiblePlanError(f"--gpus {gpus}: {problem}; {_fix(spec, workload, target, level)}")
    if gpus > 1 and (target.nvlink_gbps is None or target.nvlink_latency_us is None):
        raise InfeasiblePlanError(f"--gpus {gpus}: target {target.name} has no nvlink_gbps / nvlink_latency_us; "
                                  "add both to a target file (--target-file) to plan across GPUs")
    if _fits_with(spec, workload, target, level, gpus):
        return
    smallest = smallest_gpus_that_fit(spec, workload, target, level)
    if gpus == 1 and smallest is None:
        return          # the planner's one-GPU message names a smaller batch, budget or target
    view = rank_view(spec, replace(workload, batch=1), level)
    # what does not fit and what the target has; its own fix (a smaller batch or target) is not ours
    reason = "; ".join(infeasibility_message(view.spec, view.workload, target).split("; ")[:2])
    per_rank = "per rank, " if gpus > 1 else ""
    raise InfeasiblePlanError(f"--gpus {gpus}: {per_rank}{reason}; {_fix(spec, workload, target, level)}")


def _head_record(spec: ModelSpec, workload: Workload, level: str) -> dict:
    head, gpus = workload.head_for(spec), workload.gpus
    split = tp.head_is_split(head, gpus, level)
    rank = tp.rank_head(head, gpus, level)
    how = ("split per KV head like the LLM's: each rank selects for its own KV heads, no communication"
           if split else "replicated: every rank runs the whole head and computes the same selection"
           + (" (batch-level selection is one set for every KV head)" if level == "batch"
              else " (its heads do not divide over the ranks)"))
    return {"split": "per KV head" if split else "replicated", "how": how,
            "query_heads_per_rank": rank.head_num_heads, "kv_heads_per_rank": rank.head_num_kv_heads,
            "rank_kv_heads": tp.rank_kv_heads(head.head_num_kv_heads, gpus) if split else None}


def plan_record(spec: ModelSpec, workload: Workload, target: Target, level: str, batch: int) -> dict | None:
    """plan.json's tensor_parallel object (None for one GPU): the split, per-rank bytes, the all-reduce."""
    gpus = workload.gpus
    if gpus == 1:
        return None
    work = replace(workload, batch=batch)
    view = rank_view(spec, work, level)
    message = tp.layer_allreduce_bytes(spec, batch)
    return {
        "gpus": gpus, "layout": LAYOUT, "memory_per_rank": True,
        "query_heads_per_rank": tp.query_heads_per_rank(spec.num_heads, gpus),
        "kv_heads_per_rank": tp.kv_heads_per_rank(spec.num_kv_heads, gpus),
        "kv_head_replicas": tp.kv_head_replicas(spec.num_kv_heads, gpus),
        "rank_kv_heads": tp.rank_kv_heads(spec.num_kv_heads, gpus),
        "intermediate_per_rank": view.spec.intermediate_size,
        "weight_bytes_per_rank": memory.weight_bytes(view.spec),
        "replicated_weight_bytes": tp.replicated_params(spec) * spec.dtype_bytes,
        "pinnable_host_bytes_per_rank": memory.pinnable_host_bytes(target.host_memory_bytes, gpus),
        "allreduces_per_layer": tp.ALLREDUCES_PER_LAYER, "allreduce_bytes": message,
        "allreduce_ring_bytes": tp.ring_allreduce_bytes(message, gpus),
        "allreduce_ms_per_layer": latency.layer_allreduce_ms(view.spec, view.workload, target),
        "interconnect": {"nvlink_gbps": target.nvlink_gbps, "nvlink_latency_us": target.nvlink_latency_us},
        "retrieval_head": _head_record(spec, work, level)}

"""Re-evaluate a compiled plan's latency model under what a run actually saw.

A plan predicts its step time at the selection overlap it was compiled for (the paper's 0.8 by
default). A benchmark measures the overlap it got (random weights give ~0.13), so comparing the
measured step with the compile-time figure mixes a model error with a workload difference. This
recomputes the prediction (the step DAG's critical path, latency.py) for the plan's own residency
and schedule at the measured overlap, and `specontext inspect --selection-overlap F` shows a whole
plan re-priced that way. Imports no solver: it runs on the GPU machine, where PuLP is absent.
"""
from dataclasses import asdict, replace

from specontext_compiler.cost_models.latency import StepBreakdown, step_time, timeline
from specontext_compiler.cost_models.target import _target_from_dict
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import SpecontextError

# the per-segment predictions the planner records that depend on the overlap
_STEP_KEYS = ("step_ms", "tokens_per_s", "h2d_bytes_per_step", "hbm_bytes_per_step", "compute_ms",
              "transfer_ms", "stall_ms", "retrieval_ms", "selection_overlap", "critical_path")


def _model_inputs(plan, selection_overlap: float | None):
    """(spec, workload, target, issue_before) of a plan, at another overlap if given."""
    spec = plan.model
    target = _target_from_dict(dict(plan.target), "plan target")
    work = plan.workload
    workload = Workload(max_len=work.max_len, prompt_len=work.prompt_len, batch=work.batch, budget=work.budget,
                        sink_tokens=work.sink_tokens, recent_tokens=work.recent_tokens,
                        selection_overlap=work.selection_overlap)
    if selection_overlap is not None:
        if not 0.0 <= selection_overlap <= 1.0:
            raise SpecontextError(f"--selection-overlap {selection_overlap} must lie in [0, 1] (a fraction of rows)")
        workload = replace(workload, selection_overlap=selection_overlap)
    issue_before = {slot.layer: slot.issue_before_layer for slot in plan.schedule}
    return spec, workload, target, issue_before


def predicted_step(plan, seq_len: int, selection_overlap: float | None = None) -> StepBreakdown:
    """The plan's step at seq_len tokens, with its residency there; overlap None keeps the plan's."""
    spec, workload, target, issue_before = _model_inputs(plan, selection_overlap)
    segment = plan.segment_for(seq_len)
    return step_time(spec, workload, target, seq_len, segment.offloaded_layers, issue_before)


def repriced(plan, selection_overlap: float):
    """A copy of plan whose predictions (segments, totals, timeline) assume another overlap."""
    spec, workload, target, issue_before = _model_inputs(plan, selection_overlap)
    segments, decode_s = [], 0.0
    for seg in plan.segments:
        mid = (seg.from_len + seg.to_len) / 2      # where the planner priced the segment
        step = asdict(step_time(spec, workload, target, mid, seg.offloaded_layers, issue_before))
        segments.append(replace(seg, predicted={**seg.predicted, **{k: step[k] for k in _STEP_KEYS}}))
        decode_s += (seg.to_len - seg.from_len) * step["step_ms"] / 1e3
    last = segments[-1]
    seq_len = last.to_len
    events = timeline(spec, workload, target, seq_len, last.offloaded_layers, issue_before)
    prediction = {**plan.prediction, "timeline": [asdict(e) for e in events],
                  "step_ms_at_max_len": last.predicted["step_ms"],
                  "tokens_per_s_at_max_len": last.predicted["tokens_per_s"]}
    if "decode_s" in prediction:
        prediction.update(decode_s=decode_s, tokens_per_s=workload.batch * workload.generated_tokens / decode_s)
    return replace(plan, workload=replace(plan.workload, selection_overlap=selection_overlap),
                   segments=segments, prediction=prediction)

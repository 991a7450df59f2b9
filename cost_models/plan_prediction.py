"""Re-evaluate a compiled plan's latency model under what a run actually saw.

A plan predicts its step time at the selection overlap it was compiled for (the paper's 0.8 by
default). A benchmark measures the overlap it got (random weights give ~0.13), so comparing the
measured step with the compile-time figure mixes a model error with a workload difference. This
recomputes the prediction for the plan's own residency and schedule at the measured overlap.
Imports no solver: it runs on the GPU machine, where PuLP is absent.
"""
from dataclasses import fields, replace

from specontext_compiler.cost_models.latency import StepBreakdown, step_time
from specontext_compiler.cost_models.model_spec import ModelSpec
from specontext_compiler.cost_models.target import _target_from_dict
from specontext_compiler.cost_models.workload import Workload


def predicted_step(plan, seq_len: int, selection_overlap: float | None = None) -> StepBreakdown:
    """The plan's step at seq_len tokens, with its residency there; overlap None keeps the plan's."""
    spec = ModelSpec.from_dict(plan.model)
    target = _target_from_dict(dict(plan.target), "plan target")
    known = {f.name for f in fields(Workload)} - {"head"}
    workload = Workload(**{k: v for k, v in plan.workload.items() if k in known})
    if selection_overlap is not None:
        workload = replace(workload, selection_overlap=selection_overlap)
    segment = plan.segment_for(seq_len)
    issue_before = {slot.layer: slot.issue_before_layer for slot in plan.schedule}
    return step_time(spec, workload, target, seq_len, segment.offloaded_layers, issue_before)

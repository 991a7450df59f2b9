"""Semantic checks of a loaded plan: a plan that parses but cannot be served right is refused.

The manifest (plan_integrity.py) says the files are the compiler's; these checks say the numbers
in plan.json make sense together: field types, a budget within [1, max_len], residency segments
that tile the lengths up to max_len, layer indices in range, every number finite. Each failure is
one PlanError line naming the field.
"""
from __future__ import annotations

import math
from typing import Any

from specontext_compiler.errors import PlanError

_DICT_FIELDS = ("producer", "model", "target", "workload", "retrieval_head", "prediction", "solver", "graph")


def check_plan_data(data: dict[str, Any], where: str) -> None:
    """Checks on the raw plan.json object, before it becomes a Plan."""
    for name in _DICT_FIELDS:
        if name in data and not isinstance(data[name], dict):
            _refuse(where, f"{name} is {_kind(data[name])}, not an object")
    for name in ("segments", "schedule", "kernels", "passes"):
        if name in data and not isinstance(data[name], list):
            _refuse(where, f"{name} is {_kind(data[name])}, not a list")
        if not all(isinstance(item, dict) for item in data.get(name) or ()):
            _refuse(where, f"an entry of {name} is not an object")
    _check_finite(data, where, "plan")


def check_plan(plan, where: str, listed_files: set[str] | None = None) -> None:
    """Checks on a built Plan: workload, segments, schedule, files it names."""
    num_layers = _int(plan.model.num_layers, where, "model.num_layers", low=1)
    work = plan.workload
    max_len = _int(work.max_len, where, "workload.max_len", low=1)
    budget = _int(work.budget, where, "workload.budget", low=1)
    if budget > max_len:
        _refuse(where, f"workload.budget {budget} is larger than workload.max_len {max_len}")
    _int(work.batch, where, "workload.batch", low=1)
    for name in ("sink_tokens", "recent_tokens"):
        _int(getattr(work, name), where, f"workload.{name}", low=0)
    if work.prefill_chunk_tokens is not None:
        _int(work.prefill_chunk_tokens, where, "workload.prefill_chunk_tokens", low=1)
    if work.level not in ("head", "batch"):
        _refuse(where, f"workload.level is {work.level!r}, not head or batch")
    _check_segments(plan.segments, num_layers, max_len, where)
    first = plan.segments[0].from_len
    if isinstance(work.prompt_len, int) and first > work.prompt_len:
        _refuse(where, f"segments[0] starts at {first}, after workload.prompt_len {work.prompt_len}: "
                       "no residency for the planned prompt")
    _check_schedule(plan.schedule, num_layers, where)
    if listed_files is not None:
        _check_files_listed(plan, listed_files, where)


def _check_segments(segments, num_layers: int, max_len: int, where: str) -> None:
    if not segments:
        _refuse(where, "segments is empty")
    every_layer = list(range(num_layers))
    for i, seg in enumerate(segments):
        start = _int(seg.from_len, where, f"segments[{i}].from_len", low=0)
        end = _int(seg.to_len, where, f"segments[{i}].to_len", low=start + 1)
        if i and start != segments[i - 1].to_len:
            _refuse(where, f"segments[{i}] starts at {start}, not where segments[{i - 1}] ends "
                           f"({segments[i - 1].to_len})")
        layers = [*_layers(seg.gpu_layers, where, f"segments[{i}].gpu_layers"),
                  *_layers(seg.offloaded_layers, where, f"segments[{i}].offloaded_layers")]
        if sorted(layers) != every_layer:
            _refuse(where, f"segments[{i}] does not place each of the {num_layers} layers exactly once "
                           "(gpu_layers + offloaded_layers)")
        if i == len(segments) - 1 and end != max_len:
            _refuse(where, f"the last segment ends at {end}, not at workload.max_len {max_len}")


def _check_schedule(schedule, num_layers: int, where: str) -> None:
    for i, slot in enumerate(schedule):
        layer = _int(slot.layer, where, f"schedule[{i}].layer", low=0, high=num_layers - 1)
        _int(slot.issue_before_layer, where, f"schedule[{i}].issue_before_layer", low=0, high=layer)


def _check_files_listed(plan, listed: set[str], where: str) -> None:
    named = [plan.graph.file, *(k.file for k in plan.kernels)]
    named += [plan.retrieval_head.file] if plan.retrieval_head.file else []
    for name in named:
        if not isinstance(name, str) or name not in listed:
            _refuse(where, f"it names the file {name!r}, which the manifest does not cover")


def _layers(value: Any, where: str, name: str) -> list[int]:
    if not isinstance(value, list):
        _refuse(where, f"{name} is {_kind(value)}, not a list of layers")
    return [_int(v, where, f"{name} entry", low=0) for v in value]


def _int(value: Any, where: str, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _refuse(where, f"{name} is {_kind(value)}, not an integer")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        _refuse(where, f"{name} is {value}, it must be {bounds}")
    return value


def _check_finite(value: Any, where: str, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        _refuse(where, f"{path} is {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, where, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, where, f"{path}[{i}]")


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _refuse(where: str, problem: str) -> None:
    raise PlanError(f"{where}: {problem}; the plan is inconsistent, recompile it with `specontext compile`")

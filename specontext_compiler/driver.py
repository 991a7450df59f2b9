"""The compiler driver: model -> FX graph -> passes -> cost model + ILP -> codegen -> plan directory.

`compile_model` is the whole pipeline, the function behind `specontext compile` and
`specontext_compiler.compile(...)`. Each stage reports itself through `progress(stage, seconds
so far)`, so the CLI can show rich progress; the plan is written atomically at the end.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

from specontext_compiler import __version__
from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.plan import SCHEMA_VERSION, Plan, PrefetchSlot, check_plan_output, write_plan_dir
from specontext_compiler.runtime.plan_integrity import plan_manifest
from specontext_compiler.runtime.plan_records import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, GraphRecord,
                                                      HeadRecord, KernelRecord, PassRecord, PlanModel, PlanWorkload)
from specontext_compiler.sizes import parse_batch, parse_tokens

Progress = Callable[[str, float], None]
STAGES = ("load model", "retrieval head", "plan (ILP)", "export", "passes", "codegen", "write")
HEAD_FILE = "retrieval_head.safetensors"
SELF_HEAD = "self:0"        # --dlm spelling of the LLM's own layer 0, built at bind time


def compile_model(model: str, target: str = "a100", max_len: int | str = "128k", *,
                  batch: int | str = 1, budget: int | None = None, sink_tokens: int = DEFAULT_SINK_TOKENS,
                  recent_tokens: int = DEFAULT_RECENT_TOKENS, out: str | Path | None = None, dlm: str | None = None,
                  target_file: str | None = None, prompt_len: int | str | None = None,
                  selection_overlap: float = 0.8, level: str = "head", distill: bool = True,
                  gpus: int = 1, fuse: bool = True, progress: Progress | None = None) -> Plan:
    """Compile a plan for serving MODEL on TARGET up to max_len tokens; write it to `out`.

    budget: selected KV tokens per layer per step; None is DEFAULT_BUDGET, or max_len if shorter.
    dlm: a draft model (directory or GGUF of the same tokenizer), a retrieval-head file, "self:0"
    for the LLM's own layer 0, or None: for a model with weights, the distilled head cached for
    it, else (distill=True and a CUDA GPU) one distilled now into the cache, else self:0 with a
    warning (distill/default_head.py). level: "head" (a token set per KV-head group, the paper's)
    or "batch" (one). gpus: tensor-parallel GPUs of one machine; every cost is then one rank's
    (cost_models/tensor_parallel.py) and plan.json gains a tensor_parallel record. fuse: merge the
    projections that read one input into one GEMM (passes/merge_projections.py; not for gpus > 1)
    and replace the graph's norms, RoPE and MLP activation by fused kernels
    (passes/fuse_elementwise.py); False keeps the captured aten nodes (to compare, or to debug a
    model the fusion mishandles).
    """
    from specontext_compiler import models
    from specontext_compiler.cost_models.ilp import plan_residency
    from specontext_compiler.cost_models.tensor_parallel_plan import check_gpus, plan_record, rank_view
    from specontext_compiler.cost_models.workload import Workload
    from specontext_compiler.dlm_geometry import check_level

    check_level(level)
    clock = _Clock(progress)
    clock.stage("load model")
    source, spec, max_len_tokens, hw = _model_and_target(model, max_len, target, target_file)
    budget, batch = _budget(budget, max_len_tokens), parse_batch(batch)
    out_dir = Path(out) if out else default_plan_dir(model, target, target_file)
    check_plan_output(out_dir)          # refuse a path that is not ours, or unwritable, before any slow work
    prompt_tokens = parse_tokens(prompt_len, "--prompt-len") if prompt_len else _default_prompt(max_len_tokens)

    clock.stage("retrieval head")       # before the ILP (its size is costed) and the passes (taps)
    head_info, files, head_shape = _retrieval_head(dlm, source, model, level, max_len_tokens, distill)
    workload = Workload(max_len=max_len_tokens, prompt_len=prompt_tokens,
                        batch=batch if isinstance(batch, int) else 1, budget=budget,
                        sink_tokens=sink_tokens, recent_tokens=recent_tokens,
                        selection_overlap=selection_overlap, head=head_shape, gpus=gpus)
    check_gpus(spec, workload, hw, level)
    whole_spec, view = spec, rank_view(spec, workload, level)
    spec, workload = view.spec, view.workload       # from here on, costs are one rank's

    clock.stage("plan (ILP)")
    windows = models.layer_windows(source.config)
    solution = plan_residency(spec, workload, hw, batch=batch,
                              resident_layers=[i for i, w in enumerate(windows) if w])
    plan_workload = _plan_workload(workload, solution, level,
                                   _prefill_chunk(spec, workload, hw, solution, windows))
    graph, kernels, passes = _program(clock, source.config, whole_spec, solution, plan_workload, head_info,
                                      windows, files, tensor_parallel=gpus > 1, fuse=fuse)
    plan = Plan(schema_version=list(SCHEMA_VERSION), producer=_producer(),
                model=_plan_model(whole_spec, source, windows), target=_target_record(hw, gpus),
                workload=plan_workload, retrieval_head=HeadRecord.from_dict(head_info),
                segments=list(solution.segments), schedule=[PrefetchSlot(*slot) for slot in solution.schedule],
                prediction=_prediction(solution, spec, workload, hw), solver=dict(solution.solver),
                graph=graph, kernels=kernels, passes=passes,
                tensor_parallel=plan_record(whole_spec, replace(workload, head=head_shape), hw, level, solution.batch))

    _write(clock, plan, files, out_dir)
    return plan


def _model_and_target(model: str, max_len, target: str, target_file: str | None):
    """(source, ModelSpec, max_len in tokens, Target): the model's config and the GPU's figures."""
    from specontext_compiler import models
    from specontext_compiler.cost_models.target import load_target, load_target_file
    source = models.resolve_model(model)
    spec = models.spec_from_config(source.config, source.name)
    max_len_tokens = parse_tokens(max_len, "--max-len")
    models.check_max_len(spec, max_len_tokens)
    hw = load_target_file(target_file) if target_file else load_target(target)
    return source, spec, max_len_tokens, hw


def _write(clock: "_Clock", plan: Plan, files: dict, out_dir: Path) -> None:
    """The report and the manifest beside the plan's files, published in one step."""
    clock.stage("write")
    from specontext_compiler.report import render_report_markdown
    files["report.md"] = render_report_markdown(plan)
    files.update(plan_manifest(plan.to_json(), files))
    write_plan_dir(plan, out_dir, files)     # an OSError there becomes a one-line PlanError
    clock.stage("done")


def default_plan_dir(model: str, target: str, target_file: str | None = None) -> Path:
    """plans/<model>-<target>: the model's last path part, the target's name as given (a target
    file's stem), only file-name-safe characters. The CLI and library callers share it."""
    name = Path(model.rstrip("/")).name or model
    target_name = Path(target_file).stem if target_file else target
    return Path("plans") / re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{target_name}")


class _Clock:
    def __init__(self, progress: Progress | None):
        self.progress, self.start = progress, time.perf_counter()

    def stage(self, name: str) -> None:
        if self.progress is not None:
            self.progress(name, time.perf_counter() - self.start)


DEFAULT_BUDGET = 2048


def _budget(budget: int | None, max_len: int) -> int:
    """The budget to plan for: the user's (checked by Workload) or the default, capped at max_len."""
    if budget is None:
        return min(DEFAULT_BUDGET, max_len)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise SpecontextError(f"--budget {budget!r} is not a whole number of tokens")
    return budget


def _default_prompt(max_len: int) -> int:
    """Without --prompt-len, plan for prompts of 1/16 of max-len (at least 1 token)."""
    return max(1, min(2048, max_len // 16))


def _program(clock: "_Clock", config, spec, solution, workload: PlanWorkload, head_info: dict, windows: list[int],
             files: dict, tensor_parallel: bool = False, fuse: bool = True):
    """Export, rewrite and emit the decode step: (graph, kernel and pass records); adds the files."""
    from specontext_compiler.capture import capture_decode_graph
    from specontext_compiler.codegen.emit_graph import emit_graph_source
    from specontext_compiler.codegen.emit_kernels import emit_kernels
    from specontext_compiler.pipeline import run_pipeline
    clock.stage("export")
    captured = capture_decode_graph(config)

    clock.stage("passes")
    offloaded_ever = sorted(set().union(*(set(s.offloaded_layers) for s in solution.segments)))
    graph_module, pass_records = run_pipeline(captured.graph_module, offloaded_ever, dict(solution.schedule),
                                              feature_layers=head_info["feature_layers"],
                                              window_layers=[i for i, w in enumerate(windows) if w],
                                              tensor_parallel=tensor_parallel, fuse=fuse)

    clock.stage("codegen")
    graph_source, graph_record = emit_graph_source(graph_module)
    files["decode_graph.py"] = graph_source
    kernel_files, kernel_records = emit_kernels(spec.to_dict(), asdict(workload))
    files.update(kernel_files)
    return (GraphRecord.from_dict(graph_record), [KernelRecord.from_dict(k) for k in kernel_records],
            [PassRecord.from_dict(p) for p in pass_records])


def _retrieval_head(dlm: str | None, source, model: str, level: str, max_len: int, distill: bool = True):
    """(plan record, files, shape for the cost model) of the retrieval head.

    With a DLM the head is extracted now and stored in the plan (HEAD_FILE; a shared embedding is
    attached from the LLM's weights at bind time) and the cost model prices its real parameters
    (a fused head's fc included); feature_layers say which hidden states the graph taps. Without
    one, a model with weights gets its cached (or freshly distilled) head as if it were --dlm
    (default_head.py); otherwise, and for "self:0", the LLM's own layer 0 is built at bind time
    and the cost model keeps its EAGLE-3 shape.
    """
    from specontext_compiler import head_info
    if dlm is None:
        from specontext_compiler.distill.default_head import default_head_file
        found = default_head_file(source, model, distill=distill)
        dlm = str(found) if found is not None else SELF_HEAD
    if dlm in (SELF_HEAD, "self"):
        from specontext_compiler.dlm import llm_geometry, selection_kv_heads
        return head_info.self_head_record(level, selection_kv_heads(llm_geometry(source.config), level)), {}, None
    from specontext_compiler.cost_models.workload import RetrievalHead as HeadShape
    from specontext_compiler.dlm import extract_retrieval_head
    head, report = extract_retrieval_head(dlm, source.config, level=level, extend_to=max_len,
                                          llm_source=source.path)
    shape = HeadShape(head_num_heads=head.num_heads, head_num_kv_heads=head.num_kv_heads, head_dim=head.head_dim,
                      head_input_dim=head.input_width, head_params=head.param_count(include_embedding=False))
    return {**report, "source": str(dlm), "file": HEAD_FILE}, {HEAD_FILE: head.to_bytes()}, shape


def _target_record(hw, gpus: int) -> dict:
    """The target's fields for plan.json; a one-GPU plan leaves out the interconnect it never uses."""
    from specontext_compiler.cost_models.target import INTERCONNECT_KEYS
    record = dict(vars(hw))
    if gpus == 1:
        record = {k: v for k, v in record.items() if k not in INTERCONNECT_KEYS}
        record["sources"] = {k: v for k, v in hw.sources.items() if k not in INTERCONNECT_KEYS}
    return record


def _plan_model(spec, source, windows: list[int]) -> PlanModel:
    from specontext_compiler.models import config_sha256
    return PlanModel(**spec.to_dict(), layer_windows=windows, config_sha256=config_sha256(source.config),
                     source=str(source.path) if source.path else None, preset=source.preset)


def _plan_workload(workload, solution, level: str, prefill_chunk: int) -> PlanWorkload:
    return PlanWorkload(max_len=workload.max_len, prompt_len=workload.prompt_len, batch=solution.batch,
                        budget=workload.budget, sink_tokens=workload.sink_tokens,
                        recent_tokens=workload.recent_tokens, width=workload.window_tokens,
                        selection_overlap=workload.selection_overlap, level=level, dtype="bfloat16",
                        prefill_chunk_tokens=prefill_chunk)


def _prefill_chunk(spec, workload, hw, solution, windows) -> int:
    """Prompt tokens per prefill forward: what fits in the memory the solved plan leaves free."""
    from dataclasses import replace

    from specontext_compiler.cost_models import memory
    work = replace(workload, batch=solution.batch)
    residency = [(len(seg.gpu_layers), seg.to_len) for seg in solution.segments]
    free = memory.free_bytes_at_peak(spec, work, hw.gpu_memory_bytes, residency, hw.unified_memory)
    return memory.prefill_chunk_tokens(spec, work, free, masked=any(windows))


def _prediction(solution, spec, workload, hw) -> dict:
    """Summary, per-segment memory breakdown and one step's overlap timeline at max-len."""
    from dataclasses import replace

    from specontext_compiler.cost_models import memory
    from specontext_compiler.cost_models.latency import timeline
    work = replace(workload, batch=solution.batch)
    breakdown = []
    for seg in solution.segments:
        gpu, off = len(seg.gpu_layers), len(seg.offloaded_layers)
        breakdown.append({
            "from_len": seg.from_len, "to_len": seg.to_len,
            "weights": memory.weight_bytes(spec), "retrieval_head": memory.head_weight_bytes(spec, work),
            "head_k_cache": memory.head_k_cache_bytes(spec, work, seg.to_len),
            "resident_kv": memory.resident_kv_bytes(spec, work, gpu, seg.to_len),
            "budget_buffers": memory.budget_buffer_bytes(spec, work, off),
            "workspace": memory.workspace_bytes(spec, work, seg.to_len),
            "total": memory.gpu_bytes(spec, work, gpu, seg.to_len),
            "host_pinned": memory.host_bytes(spec, work, off, seg.to_len)})
    last = solution.segments[-1]
    events = timeline(spec, work, hw, last.to_len, offloaded_layers=last.offloaded_layers,
                      issue_before=dict(solution.schedule))
    return {"batch": solution.batch, "max_len": workload.max_len, **dict(solution.predicted),
            "step_ms_at_max_len": last.predicted.get("step_ms"),
            "tokens_per_s_at_max_len": last.predicted.get("tokens_per_s"),
            "batch_search": list(solution.batch_search), "memory_breakdown": breakdown,
            "timeline": [asdict(e) for e in events]}


def _producer() -> dict:
    versions = {"specontext": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "pulp", "triton"):
        try:
            versions[name] = metadata.version(name.replace("pulp", "PuLP") if name == "pulp" else name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions

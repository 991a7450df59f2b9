"""The plan report: what `specontext inspect` prints and the report.md written into a plan dir.

It reads only the Plan record (runtime/plan.py) and renders four views of the compiler's choice
(paper s.6, the adaptive memory manager): per-layer KV residency as the sequence grows, the GPU
memory each segment needs, the predicted copy/compute overlap of one decode step, and the
per-segment predictions with solver and pass statistics. Each view is built once as plain rows,
then drawn either with rich (terminal) or as markdown tables (report.md, no ANSI).
"""
from __future__ import annotations

import re
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from specontext_compiler.head_info import head_summary
from specontext_compiler.report_timeline import critical_path_line, find_stalls, gantt, gantt_text
from specontext_compiler.runtime.plan import Plan, Segment

GIB = 1024 ** 3
MB = 1000 ** 2
TIMELINE_WIDTH_CHARS = 64
_NUMERIC = re.compile(r"-|[0-9][0-9,.]*%?|[0-9]+/[0-9]+")
# memory_breakdown keys that are not GPU memory components
_NOT_COMPONENTS = {"from_len", "to_len", "total", "host_pinned"}


# -- formatting ---------------------------------------------------------------------------------
def format_tokens(tokens: int) -> str:
    """131072 -> '128k', 1048576 -> '1M', 1000 -> '1000' (k = 1024, as --max-len parses)."""
    if tokens >= 1024 ** 2 and tokens % 1024 ** 2 == 0:
        return f"{tokens // 1024 ** 2}M"
    if tokens >= 1024 and tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    if tokens >= 10 * 1024:
        return f"{tokens / 1024:.1f}k"
    return str(tokens)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):,.{digits}f}"


def _value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _gib(value: Any) -> str:
    return "-" if value is None else f"{float(value) / GIB:.2f}"


def _range(seg: Segment) -> str:
    return f"{format_tokens(seg.from_len)}–{format_tokens(seg.to_len)}"


def _component_name(key: str) -> str:
    return key.removesuffix("_bytes").replace("_", " ")


# -- the views as plain rows --------------------------------------------------------------------
def residency_strip(seg: Segment, num_layers: int) -> str:
    """One char per layer: 'G' keeps full KV on the GPU, 'C' is offloaded to pinned host memory."""
    gpu = set(seg.gpu_layers)
    return "".join("G" if layer in gpu else "C" for layer in range(num_layers))


def _layer_ruler(num_layers: int) -> str:
    ruler = [" "] * num_layers
    for layer in range(0, num_layers, 10):
        if layer + len(str(layer)) <= num_layers:
            ruler[layer:layer + len(str(layer))] = str(layer)
    return "".join(ruler)


def selection_overlap(plan: Plan) -> float | None:
    """The selection overlap the plan's predictions assume (share of rows already selected)."""
    return plan.workload.selection_overlap


def _prediction_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    headers = ["seq len", "GPU layers", "step ms", "tok/s", "overlap", "compute ms", "copy ms",
               "stall ms", "retrieval ms", "H2D MB/step"]
    rows = []
    for seg in plan.segments:
        p = seg.predicted
        h2d = p.get("h2d_bytes_per_step")
        rows.append([_range(seg), f"{len(seg.gpu_layers)}/{plan.model.num_layers}",
                     _num(p.get("step_ms")), _num(p.get("tokens_per_s"), 1),
                     _num(p.get("selection_overlap")),
                     _num(p.get("compute_ms")), _num(p.get("transfer_ms")),
                     _num(p.get("stall_ms")), _num(p.get("retrieval_ms")),
                     "-" if h2d is None else _num(h2d / MB, 1)])
    return headers, rows


def _memory_components(plan: Plan) -> list[dict[str, float]]:
    """Per segment, GPU bytes by component: prediction["memory_breakdown"] holds one
    {from_len, to_len, <component>: bytes, ..., total, host_pinned} per segment."""
    by_start = {entry["from_len"]: entry for entry in plan.prediction["memory_breakdown"]}
    return [dict(by_start.get(seg.from_len, {})) for seg in plan.segments]


def _memory_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    components = _memory_components(plan)
    names = list(dict.fromkeys(n for comp in components for n in comp if n not in _NOT_COMPONENTS))
    target_bytes = plan.target["gpu_memory_bytes"]
    headers = ["up to", *(_component_name(n) for n in names), "GPU total", "of GPU", "host pinned"]
    rows = []
    for seg, comp in zip(plan.segments, components):
        total, host = comp.get("total"), comp.get("host_pinned")
        share = "-" if not (total and target_bytes) else f"{100 * total / target_bytes:.0f}%"
        rows.append([format_tokens(seg.to_len), *(_gib(comp.get(n)) for n in names), _gib(total), share,
                     _gib(host)])
    return headers, rows


def _timeline_events(plan: Plan) -> list[dict[str, Any]]:
    return sorted(plan.prediction["timeline"], key=lambda e: (e["start_ms"], e["end_ms"]))



def _kv_lines(plan: Plan) -> list[tuple[str, str]]:
    m, w, r = plan.model, plan.workload, plan.retrieval_head
    return [
        ("model", f"{m.name} ({m.architecture}, {m.num_layers} layers, {m.attention_kind})"),
        ("target", f"{plan.target['name']} ({_gib(plan.target['gpu_memory_bytes'])} GiB GPU)"),
        ("workload", f"max len {format_tokens(w.max_len)} tokens, prompt {_value(w.prompt_len)}, batch {w.batch}, "
                     f"budget {w.budget}, sinks {w.sink_tokens}, recent {w.recent_tokens}, "
                     f"selection overlap {_value(w.selection_overlap)}"),
        *_tensor_parallel_lines(plan),
        ("retrieval head", head_summary(r.to_dict())),
        *([("head accuracy", r.facts["accuracy"])] if r.facts.get("accuracy") else []),
        ("solver", ", ".join(f"{k} {_value(v)}" for k, v in plan.solver.items())),
        ("prefetch issue→wait", _schedule_line(plan)),
        ("prediction", (", ".join(f"{k} {_value(v)}" for k, v in plan.prediction.items()
                                  if isinstance(v, (int, float, str))) or "-")
         + f" (at selection overlap {_value(selection_overlap(plan))})"),
        ("graph", f"{plan.graph.file}, {_value(plan.graph.nodes)} nodes"),
        ("kernels", ", ".join(k.family for k in plan.kernels) or "-"),
    ]


def _tensor_parallel_lines(plan: Plan) -> list[tuple[str, str]]:
    """The GPUs a tensor-parallel plan spans, each rank's share, and how the retrieval head is split."""
    tp = plan.tensor_parallel
    if not tp:
        return []
    ranks = "; ".join(f"rank {i}: KV {','.join(map(str, heads))}" for i, heads in enumerate(tp["rank_kv_heads"]))
    head = tp["retrieval_head"]
    return [("GPUs", f"{tp['gpus']}, tensor parallel: {tp['query_heads_per_rank']} query heads, "
                     f"{tp['kv_heads_per_rank']} KV heads (x{tp['kv_head_replicas']}), MLP width "
                     f"{tp['intermediate_per_rank']} per rank ({ranks}); weights {_gib(tp['weight_bytes_per_rank'])} "
                     f"GiB per rank; {tp['allreduces_per_layer']} all-reduces of {tp['allreduce_bytes']} bytes per "
                     f"layer, {_num(tp['allreduce_ms_per_layer'] * 1e3, 1)} us; memory is per rank, the ranks step together"),
            ("retrieval head ranks", f"{head['how']} ({head['query_heads_per_rank']} query / "
                                     f"{head['kv_heads_per_rank']} KV heads per rank)")]


def _memory_title(plan: Plan) -> str:
    return "GPU memory per segment (GiB" + (", per rank)" if plan.tensor_parallel else ")")


def _schedule_line(plan: Plan, shown: int = 16) -> str:
    if not plan.schedule:
        return "none (every layer keeps full KV on the GPU)"
    slots = ", ".join(f"L{s.issue_before_layer}→L{s.layer}" for s in plan.schedule[:shown])
    more = len(plan.schedule) - shown
    return slots + (f", ... (+{more} more)" if more > 0 else "")


def _pass_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    rows = [[p.name, _num(p.seconds, 3), _value(p.nodes),
             ", ".join(f"{k}={v}" for k, v in p.counters.items()) or "-"] for p in plan.passes]
    return ["pass", "seconds", "nodes after", "counters"], rows


def _timeline_caption(plan: Plan) -> str:
    return (f"one decode step at {format_tokens(plan.segments[-1].to_len)} tokens, "
            f"selection overlap {_value(selection_overlap(plan))}")



# -- rich --------------------------------------------------------------------------------------
def _bare_table(show_header: bool = True) -> Table:
    return Table(box=None, pad_edge=False, padding=(0, 1), collapse_padding=True,
                 show_header=show_header, header_style="bold cyan")


def _titled(title: str, body: RenderableType) -> Group:
    # a title above the table, not Table(title=...), which wraps to the table's width
    return Group(Text(title, style="bold underline"), body)


def _rich_table(title: str, headers: list[str], rows: list[list[str]]) -> Group:
    table = _bare_table()
    for i, header in enumerate(headers):
        numeric = i > 0 and all(_NUMERIC.fullmatch(row[i]) for row in rows)
        table.add_column(header, justify="right" if numeric else "left", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return _titled(title, table)


def _rich_residency(plan: Plan) -> Group:
    num_layers = plan.model.num_layers
    table = _bare_table()
    table.add_column("seq len", no_wrap=True)
    table.add_column(_layer_ruler(num_layers), no_wrap=True)
    table.add_column("on GPU", justify="right", no_wrap=True)
    for seg in plan.segments:
        strip = Text()
        for ch in residency_strip(seg, num_layers):
            strip.append(ch, style="bold green" if ch == "G" else "yellow")
        table.add_row(_range(seg), strip, f"{len(seg.gpu_layers)}/{num_layers}")
    return _titled("KV residency per layer (G = full KV on GPU, C = offloaded to host)", table)


def _rich_timeline(plan: Plan) -> Group:
    events = _timeline_events(plan)
    title = f"Predicted overlap, {_timeline_caption(plan)}"
    if not events:
        return _titled(title, Text("(the plan has no timeline)", style="dim"))
    table = _bare_table(show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    palette = {"compute": ("blue", "cyan"), "copy": ("magenta", "yellow"), "stall": ("bold red",) * 2,
               "critical": ("bold white",) * 2}
    for stream, cells in gantt(events, TIMELINE_WIDTH_CHARS):
        table.add_row(stream, gantt_text(cells, TIMELINE_WIDTH_CHARS, palette.get(stream, ("white", "grey50"))))
    stalls = find_stalls(events)
    t0, t1 = events[0]["start_ms"], max(e["end_ms"] for e in events)
    table.add_row("", Text(f"{t0:.2f} ms".ljust(TIMELINE_WIDTH_CHARS - 10) + f"{t1:.2f} ms".rjust(10),
                           style="dim"))
    worst = sorted(stalls, key=lambda s: -s[2])[:2]
    if stalls:
        note = Text(f"compute waits {sum(s[2] for s in stalls):.3f} ms in {len(stalls)} stalls; longest: "
                    + ", ".join(f"{s[2]:.3f} ms ({s[0]})" for s in worst), style="red")
    elif any(e["stream"] == "copy" for e in events):
        note = Text("no stalls: every copy hides behind compute", style="green")
    else:
        note = Text("no copies: nothing is offloaded at this length", style="green")
    path = critical_path_line(events)
    return _titled(title, Group(table, note, Text(path, style="dim")) if path else Group(table, note))


def render_report(plan: Plan) -> list[RenderableType]:
    """The inspect report as rich renderables, in reading order (print each with a Console)."""
    header = _bare_table(show_header=False)
    header.add_column(style="bold", no_wrap=True)
    header.add_column()
    for key, value in _kv_lines(plan):
        header.add_row(key, value)
    parts: list[RenderableType] = [header, _rich_residency(plan),
                                   _rich_table("Predictions per segment", *_prediction_rows(plan)),
                                   _rich_table(_memory_title(plan), *_memory_rows(plan)),
                                   _rich_timeline(plan)]
    if plan.passes:
        parts.append(_rich_table("Compiler passes", *_pass_rows(plan)))
    return parts


# -- markdown and json -------------------------------------------------------------------------
def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    numeric = [i > 0 and all(_NUMERIC.fullmatch(row[i]) for row in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_timeline(plan: Plan) -> str:
    events = _timeline_events(plan)
    if not events:
        return "(the plan has no timeline)"
    lines = []
    for stream, cells in gantt(events, TIMELINE_WIDTH_CHARS):
        lines.append(f"{stream:<8} " + gantt_text(cells, TIMELINE_WIDTH_CHARS, ("", "")).plain)
    lines.append(" " * 9 + f"0 .. {max(e['end_ms'] for e in events) - events[0]['start_ms']:.2f} ms")
    stalls = find_stalls(events)
    lines.append(f"stalls: {len(stalls)}, {sum(s[2] for s in stalls):.3f} ms")
    if critical_path_line(events):
        lines.append(critical_path_line(events))
    return "```\n" + "\n".join(lines) + "\n```"


def render_report_markdown(plan: Plan) -> str:
    """report.md for a plan directory: the inspect report as plain markdown (no ANSI codes)."""
    num_layers = plan.model.num_layers
    residency = "\n".join(f"{_range(seg):>13} {residency_strip(seg, num_layers)} "
                          f"{len(seg.gpu_layers)}/{num_layers}" for seg in plan.segments)
    parts = [f"# Plan: {plan.model.name} on {plan.target['name']}", "",
             *(f"- **{k}**: {v}" for k, v in _kv_lines(plan)), "",
             "## KV residency per layer (G = GPU, C = offloaded to host)", "",
             "```\n" + " " * 14 + _layer_ruler(num_layers) + "\n" + residency + "\n```", "",
             "## Predictions per segment", "", _md_table(*_prediction_rows(plan)), "",
             f"## {_memory_title(plan)}", "", _md_table(*_memory_rows(plan)), "",
             f"## Predicted overlap, {_timeline_caption(plan)}", "", _md_timeline(plan), ""]
    if plan.passes:
        parts += ["## Compiler passes", "", _md_table(*_pass_rows(plan)), ""]
    return "\n".join(parts)


def plan_summary_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-able dict plus a `summary` of the headline numbers (for --json)."""
    data = plan.to_dict()
    data["directory"] = str(plan.directory) if plan.directory else None
    last = plan.segments[-1]
    data["summary"] = {
        "model": plan.model.name,
        "target": plan.target["name"],
        "max_len": plan.workload.max_len,
        "batch": plan.workload.batch,
        "selection_overlap": selection_overlap(plan),
        "num_layers": plan.model.num_layers,
        "gpus": plan.tensor_parallel["gpus"] if plan.tensor_parallel else 1,
        "num_segments": len(plan.segments),
        "gpu_layers_at_max_len": len(last.gpu_layers),
        "tokens_per_s_at_max_len": last.predicted.get("tokens_per_s"),
        "step_ms_at_max_len": last.predicted.get("step_ms"),
        "solver_status": plan.solver.get("status"),
    }
    return data

"""`specontext inspect --plot`: the plan's memory and one-step timeline as a PNG.

Left: GPU memory against sequence length, stacked by component, with the target's memory as a
line (the paper's Fig. 9 view of s.6: KV offloads layer by layer as the sequence grows).
Right: the predicted decode step as the step DAG schedules it (cost_models/step_dag.py): one bar
per operation on its stream (compute, copy), stalls in red, the critical path outlined.
matplotlib is an optional dependency (`pip install 'specontext[plot]'`), imported only here.
"""
from __future__ import annotations

from pathlib import Path

from specontext_compiler.errors import SpecontextError
from specontext_compiler.report import _NOT_COMPONENTS, GIB, _memory_components, _timeline_caption, \
    _timeline_events, format_tokens
from specontext_compiler.report_timeline import find_stalls, is_stall
from specontext_compiler.runtime.atomic_dir import nearest_existing
from specontext_compiler.runtime.plan import Plan


def write_plot(plan: Plan, path: str | Path) -> Path:
    """Write a two-panel PNG of the plan to path (parent dirs created); returns the path."""
    out = check_plot_path(path)
    import matplotlib
    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.3]})
    _memory_panel(mem_ax, plan)
    _timeline_panel(time_ax, plan)
    fig.suptitle(f"{plan.model.name} on {plan.target['name']}: "
                 f"max len {format_tokens(plan.workload.max_len)}, "
                 f"batch {plan.workload.batch}, budget {plan.workload.budget}")
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, format="png")
    except OSError as exc:
        raise SpecontextError(f"cannot write the plot {out}: {exc.strerror or exc}; choose another --plot path") from exc
    finally:
        plt.close(fig)
    return out


def check_plot_path(path: str | Path) -> Path:
    """The PNG path as given; refused if it is a directory or names another format
    (matplotlib would otherwise add .png to a bare name or write another format)."""
    out = Path(path)
    if out.is_dir():
        raise SpecontextError(f"--plot {out} is a directory; give a file name such as {out / 'plan.png'}")
    if out.suffix.lower() != ".png":
        raise SpecontextError(f"--plot {out}: the plot is a PNG, name it {out.with_suffix('.png').name}")
    existing = nearest_existing(out.absolute().parent)
    if not existing.is_dir():
        raise SpecontextError(f"--plot {out}: {existing} is a file, so no folder can be made under it")
    return out


def _memory_panel(ax, plan: Plan) -> None:
    components = [{k: v for k, v in comp.items() if k not in _NOT_COMPONENTS} for comp in _memory_components(plan)]
    names = list(dict.fromkeys(n for comp in components for n in comp))
    edges = [seg.from_len for seg in plan.segments] + [plan.segments[-1].to_len]
    floor = [0.0] * len(edges)
    for name in names:
        values = [comp.get(name, 0.0) / GIB for comp in components]
        values.append(values[-1])  # step="post" needs the last level repeated at the end
        top = [f + v for f, v in zip(floor, values)]
        ax.fill_between(edges, floor, top, step="post", alpha=0.85,
                        label=name.removesuffix("_bytes").replace("_", " "))
        floor = top
    target_gib = plan.target["gpu_memory_bytes"] / GIB
    if target_gib:
        ax.axhline(target_gib, color="black", linestyle="--", linewidth=1,
                   label=f"{plan.target['name']} memory ({target_gib:.0f} GiB)")
    for seg in plan.segments[1:]:
        ax.axvline(seg.from_len, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xlim(edges[0], edges[-1])
    if edges[0] > 0 and edges[-1] / edges[0] >= 8:  # thresholds grow geometrically: log axis spaces them
        ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("GPU memory (GiB)")
    ax.set_title("GPU memory by component (grey lines: a layer set offloads)", fontsize=10)
    ax.xaxis.set_major_formatter(lambda x, _: format_tokens(int(x)) if x >= 0 else "")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)


def _timeline_panel(ax, plan: Plan) -> None:
    events = _timeline_events(plan)
    ax.set_title(f"Predicted overlap, {_timeline_caption(plan)}", fontsize=10)
    if not events:
        ax.text(0.5, 0.5, "the plan has no timeline", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    streams = list(dict.fromkeys(e["stream"] for e in sorted(events, key=lambda e: e["stream"] != "compute")
                                 if not is_stall(e)))
    colors = {"compute": ("tab:blue", "lightsteelblue"), "copy": ("tab:purple", "plum")}
    labelled = False
    for row, stream in enumerate(streams):
        ops = [e for e in events if e["stream"] == stream and not is_stall(e)]
        shades = colors.get(stream, ("tab:gray", "lightgray"))
        ax.broken_barh([(e["start_ms"], e["end_ms"] - e["start_ms"]) for e in ops], (row - 0.35, 0.7),
                       facecolors=[shades[i % 2] for i in range(len(ops))], edgecolor="white", linewidth=0.3)
        critical = [(e["start_ms"], e["end_ms"] - e["start_ms"]) for e in ops if e.get("critical")]
        if critical:   # the operations that set the step, outlined (one legend entry)
            ax.broken_barh(critical, (row - 0.35, 0.7), facecolors="none", edgecolor="black", linewidth=1.2,
                           label=None if labelled else "critical path")
            labelled = True
    stalls = find_stalls(events)
    if stalls:
        ax.broken_barh([(start, ms) for _, start, ms in stalls], (-0.45, 0.9), facecolors="red",
                       alpha=0.6, label=f"stall ({sum(s[2] for s in stalls):.2f} ms)")
    if stalls or any(e.get("critical") for e in events):
        ax.legend(fontsize=7, loc="upper right")
    ax.set_yticks(range(len(streams)), streams)
    ax.set_ylim(-0.6, len(streams) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")

"""`specontext inspect` (a plan's report) and `specontext targets` (the GPU targets, --probe)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from specontext_compiler.cli.app import app, edge, out_console, strict_json
from specontext_compiler.errors import SpecontextError


@app.command("inspect")
@edge
def inspect_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan and a summary as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.png", help="Also write a PNG (memory vs sequence length, one-step timeline); needs matplotlib.")] = None,
    selection_overlap: Annotated[Optional[float], typer.Option("--selection-overlap", metavar="F", help="Re-price the plan's predictions and timeline at this selection overlap (share of rows already selected at the previous step) instead of the one it was compiled for.")] = None,
) -> None:
    """Show a plan: per-layer residency, memory per segment, predicted overlap, solver and passes.

    Example: specontext inspect plans/llama-a100 --plot llama-a100.png --selection-overlap 0.9
    """
    from specontext_compiler import report
    from specontext_compiler.runtime.plan import load_plan
    if plot is not None:
        from specontext_compiler.plot import check_plot_path
        check_plot_path(plot)            # before loading and drawing anything
    plan = load_plan(plan_dir)
    if selection_overlap is not None:
        from specontext_compiler.cost_models.plan_prediction import repriced
        plan = repriced(plan, selection_overlap)
    if plot is not None:
        from specontext_compiler.plot import write_plot
        written = write_plot(plan, plot)
    if as_json:
        typer.echo(strict_json(report.plan_summary_json(plan)))
    else:
        console = out_console()
        for part in report.render_report(plan):
            console.print(part)
            console.print()
    if plot is not None:
        Console(stderr=True).print(f"wrote {written}")


def _targets_json(targets: list[Any]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(t) for t in targets]


def _targets_tables(targets: list[Any], with_sources: bool) -> list[Table]:
    figures = Table(box=None, pad_edge=False, header_style="bold cyan", collapse_padding=True)
    for header in ("name", "aliases", "GPU GiB", "HBM GB/s", "H2D GB/s", "gather GB/s", "bf16 TFLOPS", "host GiB"):
        figures.add_column(header, justify="left" if header in ("name", "aliases") else "right")
    sources = Table(box=None, pad_edge=False, header_style="bold cyan", collapse_padding=True)
    sources.add_column("figure", no_wrap=True)
    sources.add_column("source", overflow="fold")
    for t in targets:
        figures.add_row(t.name, ", ".join(t.aliases), f"{t.gpu_memory_bytes / 2**30:.0f}", f"{t.hbm_gbps:,.0f}",
                        f"{t.h2d_gbps:.1f}", f"{t.pinned_gather_gbps:.1f}", f"{t.bf16_tflops:,.0f}",
                        f"{t.host_memory_bytes / 2**30:.0f}")
        for figure, source in (t.sources or {}).items():
            sources.add_row(figure, str(source))
    return [figures, sources] if with_sources else [figures]


@app.command("targets")
@edge
def targets_cmd(
    name: Annotated[Optional[str], typer.Argument(metavar="[NAME]", help="Show one target with the source of each figure (with --probe: compare with it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the targets as JSON (bytes, GB/s, TFLOPS).")] = False,
    probe: Annotated[bool, typer.Option("--probe", help="Measure this machine's GPU the way the runtime uses it and write a target file (needs CUDA; ~1 minute).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE.toml", help="With --probe: the target file to write (never overwritten). Default: print it.")] = None,
) -> None:
    """List the built-in GPU targets: memory (GiB), bandwidths (GB/s), bf16 TFLOPS; NAME adds sources.

    Example: specontext targets h100; specontext targets h200 --probe -o my-h200.toml
    """
    if probe:
        _probe_target(name, out)
        return
    if out is not None:
        raise SpecontextError("-o/--out writes a probed target; add --probe")
    from specontext_compiler.cost_models.target import list_targets, load_target
    targets = [load_target(name)] if name else [load_target(t) if isinstance(t, str) else t for t in list_targets()]
    if as_json:
        typer.echo(strict_json(_targets_json(targets)))
        return
    console = out_console()
    for table in _targets_tables(targets, with_sources=name is not None):
        console.print(table)
        console.print()
    if name is None:
        console.print("[dim]sources of the figures: specontext targets NAME; "
                      "another GPU: --target-file FILE.toml, or measure it: specontext targets --probe[/dim]")


def _probe_target(compare: str | None, out: Path | None) -> None:
    """targets --probe: measure, write (or print) the TOML, show the figures beside a built-in's."""
    from specontext_compiler import targets_probe
    targets_probe.check_output(out)
    if compare is not None:
        from specontext_compiler.cost_models.target import load_target
        load_target(compare)        # an unknown name fails before a minute of measuring
    err = Console(stderr=True, highlight=False)
    device, figures = targets_probe.probe(lambda line: err.print(f"[dim]probing {line} ...[/dim]"))
    text = targets_probe.target_toml(targets_probe.target_name(device), device, figures)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text)
        err.print(f"wrote {out}; use it: specontext compile MODEL --target-file {out}")
    typer.echo(targets_probe.comparison_table(figures, compare))


"""`specontext compile`: options, a progress bar over the driver's stages, the summary table."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from specontext_compiler.cli.app import app, edge, key_value_table, one_line_warnings, out_console, strict_json
from specontext_compiler.runtime.plan_records import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from specontext_compiler.sizes import parse_batch, parse_tokens

PROGRESS_DELAY_S = 1.0


class _StageProgress:
    """A rich progress bar on stderr for the driver's stages, shown once a compile passes 1 s."""

    def __init__(self, enabled: bool, stages: tuple[str, ...]):
        self.enabled, self.stages = enabled, stages
        self.stage_s: dict[str, float] = {}
        self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<12}"), BarColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task = self._progress.add_task("starting", total=len(stages))
        self._stage, self._stage_t0 = None, time.perf_counter()
        self._lock, self._started, self._finished = threading.Lock(), False, False
        self._timer = threading.Timer(PROGRESS_DELAY_S, self._start)

    def _start(self) -> None:
        with self._lock:
            if not self._finished:
                self._progress.start()
                self._started = True

    def __enter__(self) -> "_StageProgress":
        if self.enabled and self._progress.console.is_terminal:
            self._timer.start()
        return self

    def __call__(self, stage: str, elapsed_s: float) -> None:
        """The driver's progress callback: called as each stage starts (elapsed_s since the start)."""
        self._close_stage()
        self._stage, self._stage_t0 = stage, time.perf_counter()
        done = self.stages.index(stage) if stage in self.stages else len(self.stage_s)
        self._progress.update(self._task, description=stage, completed=done)

    def _close_stage(self) -> None:
        if self._stage is not None and self._stage != "done":
            self.stage_s[self._stage] = time.perf_counter() - self._stage_t0

    def __exit__(self, *exc: Any) -> None:
        self._close_stage()
        self._timer.cancel()
        with self._lock:
            self._finished = True
            if self._started:
                self._progress.stop()


def _compile_summary(plan: Any, stage_s: dict[str, float]) -> Table:
    from specontext_compiler.report import format_tokens, plan_summary_json
    summary = plan_summary_json(plan)["summary"]
    first, last = plan.segments[0], plan.segments[-1]
    tok_s = summary["tokens_per_s_at_max_len"]
    rows = [("plan", str(plan.directory)),
            ("model / target", f"{summary['model']} on {summary['target']}"),
            ("workload", f"max len {format_tokens(int(summary['max_len']))} tokens, batch {summary['batch']}, "
                         f"budget {plan.workload.budget}"),
            *_gpus_row(plan),
            ("GPU layers", f"{len(first.gpu_layers)}/{summary['num_layers']} at start, "
                           f"{len(last.gpu_layers)}/{summary['num_layers']} at max len "
                           f"({len(plan.segments)} segments)"),
            ("predicted", f"{tok_s:.1f} tok/s at max len (all {summary['batch']} requests, selection overlap "
                          f"{plan.workload.selection_overlap})" if tok_s else "-"),
            ("solver", f"{plan.solver.get('name')}: {plan.solver.get('status')}"),
            ("compile time", f"{sum(stage_s.values()):.1f} s: " + ", ".join(
                f"{name} {s:.1f} s" for name, s in stage_s.items() if s >= 0.05))]
    return key_value_table(rows)


def _gpus_row(plan: Any) -> list[tuple[str, str]]:
    """The tensor-parallel split, for a plan over more than one GPU."""
    tp = plan.tensor_parallel
    if not tp:
        return []
    return [("GPUs", f"{tp['gpus']} (tensor parallel): {tp['query_heads_per_rank']} query / {tp['kv_heads_per_rank']} "
                     f"KV heads per rank; memory below is per rank")]


@app.command("compile")
@edge
def compile_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Preset name (e.g. llama-3.1-8b), HF model directory or GGUF file.")],
    target: Annotated[str, typer.Option("--target", "-t", metavar="NAME", help="Built-in GPU target name or alias; see `specontext targets`.")] = "a100",
    max_len: Annotated[str, typer.Option("--max-len", metavar="TOKENS", help="Longest sequence to plan for, in tokens; accepts 131072, 128k, 1M (k = 1024).")] = "128k",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Plan directory to write; only a specontext plan (or an empty directory) is replaced. Default: plans/<model>-<target>.")] = None,
    batch: Annotated[str, typer.Option("--batch", metavar="N|auto", help="Concurrent requests: a positive integer, or 'auto' for the largest that fits.")] = "1",
    budget: Annotated[Optional[int], typer.Option("--budget", min=1, metavar="TOKENS", help="Selected KV tokens per layer per step (the paper's B), in tokens; at most --max-len. Default: 2048, or --max-len if smaller.")] = None,
    sinks: Annotated[int, typer.Option("--sinks", min=0, metavar="TOKENS", help="Leading sink tokens always attended, in tokens.")] = DEFAULT_SINK_TOKENS,
    recent: Annotated[int, typer.Option("--recent", min=0, metavar="TOKENS", help="Most recent tokens always attended, in tokens.")] = DEFAULT_RECENT_TOKENS,
    dlm: Annotated[Optional[str], typer.Option("--dlm", metavar="DLM", help="The head that does retrieval: a retrieval-head .safetensors file (from `specontext distill`), a smaller draft model of the same tokenizer (HF directory or GGUF), or self:0 (the model's own layer 0, inaccurate on long contexts). Default for a model with weights: its head from the cache (`specontext heads`), distilled now on a GPU if there is none, else self:0 with a warning.")] = None,
    distill: Annotated[bool, typer.Option("--distill/--no-distill", help="Without --dlm, with the model's weights, no cached head and a CUDA GPU: distill a head now into the cache (minutes). --no-distill plans with self:0 instead.")] = True,
    target_file: Annotated[Optional[Path], typer.Option("--target-file", metavar="FILE", help="A target TOML file instead of a built-in target.")] = None,
    prompt_len: Annotated[Optional[str], typer.Option("--prompt-len", metavar="TOKENS", help="Expected prompt length, in tokens (131072, 128k); sets the initial residency.")] = None,
    level: Annotated[str, typer.Option("--level", metavar="head|batch", help="Selection level: 'head' picks tokens per KV-head group (the paper's; a --dlm must map its KV heads onto the LLM's), 'batch' one shared set per request (any geometry).")] = "head",
    selection_overlap: Annotated[float, typer.Option("--selection-overlap", metavar="F", help="Expected share of a step's selected rows already selected at the previous step (paper: over 0.8; measure yours with benchmarks/measure_overlap.py); elastic loading copies the rest.")] = 0.8,
    gpus: Annotated[int, typer.Option("--gpus", min=1, metavar="N", help="GPUs of one machine to split the model over (tensor parallelism: heads, KV heads and MLP per rank, an all-reduce after attention and after the MLP); costs and memory are then per rank. The target needs nvlink_gbps and nvlink_latency_us.")] = 1,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Merge the projections that read one input (q/k/v, gate/up) into one GEMM and fuse each layer's RMSNorms, RoPE and MLP activation into single kernels (default). --no-fuse keeps the captured ops: to compare, or to debug a model.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan summary as JSON instead of tables.")] = False,
) -> None:
    """Compile MODEL into a plan directory for a target GPU and a longest sequence length.

    Example: specontext compile llama-3.1-8b --target a100 --max-len 128k -o plans/llama-a100
    """
    from specontext_compiler import driver
    from specontext_compiler.dlm_geometry import check_level
    max_len_tokens = parse_tokens(max_len, "--max-len")
    prompt_tokens = parse_tokens(prompt_len, "--prompt-len") if prompt_len is not None else None
    check_level(level)
    out_dir = out or driver.default_plan_dir(model, target, str(target_file) if target_file else None)
    with _StageProgress(enabled=not as_json, stages=driver.STAGES) as progress, \
            one_line_warnings():
        plan = driver.compile_model(model, target, max_len_tokens, batch=parse_batch(batch), budget=budget,
                             sink_tokens=sinks, recent_tokens=recent, out=out_dir, dlm=dlm,
                             target_file=str(target_file) if target_file else None,
                             prompt_len=prompt_tokens, selection_overlap=selection_overlap, level=level,
                             distill=distill, gpus=gpus, fuse=fuse, progress=progress)
    if as_json:
        from specontext_compiler.report import plan_summary_json
        typer.echo(strict_json(plan_summary_json(plan)))
        return
    console = out_console()
    console.print(_compile_summary(plan, progress.stage_s))
    console.print(f"[dim]full report: specontext inspect {plan.directory}[/dim]")


"""The `specontext` command line: compile, inspect, targets, run, serve, eval, distill.

Each command parses its options, calls one library function and renders the result; user errors
(SpecontextError) and a missing optional dependency become one line on stderr and exit 2, here
and nowhere else. `--debug` (or SPECONTEXT_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.plan import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS
from specontext_compiler.sizes import parse_batch, parse_tokens

try:                        # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:         # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exceptions


class _OneLineErrors(typer.core.TyperGroup):
    """typer's usage errors (a missing argument, --budget 0) as one stderr line, like every other
    error, instead of the multi-line box typer draws."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError:
            sys.exit(2)                      # typer already printed the help
        except click_exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                Text("error: ", style="bold red") + Text(" ".join(exc.format_message().split()) + hint))
            sys.exit(exc.exit_code)
        except typer.Abort:
            Console(stderr=True).print("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, help="SpeContext ahead-of-time compiler: plan KV residency for long-context decoding, "
                       "inspect plans, run them.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)
_STATE = {"debug": False}
# optional dependency (top-level module) -> what to pip install for it (an extra, or triton itself)
_EXTRAS = {"matplotlib": "specontext[plot]", "gguf": "specontext[gguf]", "accelerate": "specontext[gguf]",
           "fastapi": "specontext[serve]", "uvicorn": "specontext[serve]",
           "triton": "triton"}    # a dependency on Linux, where its wheels exist
PROGRESS_DELAY_S = 1.0


def _out() -> Console:
    return Console(highlight=False)


def _fail(message: str) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(Text("error: ", style="bold red") + Text(" ".join(message.split())))
    raise typer.Exit(code=2)


def _edge(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors raised under a command into one stderr line and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpecontextError as exc:
            if _STATE["debug"]:
                raise
            _fail(str(exc))
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if _STATE["debug"] or top not in _EXTRAS:
                raise
            _fail(f"{top} is not installed; install it with: pip install '{_EXTRAS[top]}'")
    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from specontext_compiler import __version__
        sys.stdout.write(f"specontext {__version__}\n")
        raise typer.Exit()


@app.callback()
def _global(debug: Annotated[bool, typer.Option(
        "--debug", envvar="SPECONTEXT_DEBUG",
        help="Show the full traceback on errors (also SPECONTEXT_DEBUG=1).")] = False,
            version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print specontext's version and exit.")] = False) -> None:
    """SpeContext ahead-of-time compiler.

    Example: specontext compile llama-3.1-8b --target a100 --max-len 128k -o plans/llama
    """
    _STATE["debug"] = debug


# -- compile ------------------------------------------------------------------------------------
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


def _strict_json(data: Any) -> str:
    """JSON other programs can parse: a NaN or infinity is an error, never written as `NaN`."""
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except ValueError:
        raise SpecontextError("the result holds a number that is not finite (NaN or infinity); "
                              "check the target's figures and the options, then recompile") from None


def _compile_summary(plan: Any, stage_s: dict[str, float]) -> Table:
    from specontext_compiler.report import format_tokens, plan_summary_json
    summary = plan_summary_json(plan)["summary"]
    first, last = plan.segments[0], plan.segments[-1]
    tok_s = summary["tokens_per_s_at_max_len"]
    rows = [("plan", str(plan.directory)),
            ("model / target", f"{summary['model']} on {summary['target']}"),
            ("workload", f"max len {format_tokens(int(summary['max_len']))} tokens, batch {summary['batch']}, "
                         f"budget {plan.workload.get('budget')}"),
            ("GPU layers", f"{len(first.gpu_layers)}/{summary['num_layers']} at start, "
                           f"{len(last.gpu_layers)}/{summary['num_layers']} at max len "
                           f"({len(plan.segments)} segments)"),
            ("predicted", f"{tok_s:.1f} tok/s at max len (all {summary['batch']} requests, selection overlap "
                          f"{plan.workload.get('selection_overlap')})" if tok_s else "-"),
            ("solver", f"{plan.solver.get('name')}: {plan.solver.get('status')}"),
            ("compile time", f"{sum(stage_s.values()):.1f} s: " + ", ".join(
                f"{name} {s:.1f} s" for name, s in stage_s.items() if s >= 0.05))]
    return _key_value_table(rows)


def _key_value_table(rows: list[tuple[str, str]]) -> Table:
    """A borderless two-column summary: bold keys, their values."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


@contextlib.contextmanager
def _one_line_warnings():
    """Show specontext's own warnings as one stderr line each ('warning: ...'); others as usual."""
    from specontext_compiler.errors import SpecontextWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecontextWarning)
        yield
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for item in caught:
        if issubclass(item.category, SpecontextWarning):
            err.print(Text("warning: ", style="bold yellow") + Text(" ".join(str(item.message).split())))
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


@app.command("compile")
@_edge
def compile_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Preset name (e.g. llama-3.1-8b), HF model directory or GGUF file.")],
    target: Annotated[str, typer.Option("--target", "-t", metavar="NAME", help="Built-in GPU target name or alias; see `specontext targets`.")] = "a100",
    max_len: Annotated[str, typer.Option("--max-len", metavar="TOKENS", help="Longest sequence to plan for, in tokens; accepts 131072, 128k, 1M (k = 1024).")] = "128k",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Plan directory to write; only a specontext plan (or an empty directory) is replaced. Default: plans/<model>-<target>.")] = None,
    batch: Annotated[str, typer.Option("--batch", metavar="N|auto", help="Concurrent requests: a positive integer, or 'auto' for the largest that fits.")] = "1",
    budget: Annotated[Optional[int], typer.Option("--budget", min=1, metavar="TOKENS", help="Selected KV tokens per layer per step (the paper's B), in tokens; at most --max-len. Default: 2048, or --max-len if smaller.")] = None,
    sinks: Annotated[int, typer.Option("--sinks", min=0, metavar="TOKENS", help="Leading sink tokens always attended, in tokens.")] = DEFAULT_SINK_TOKENS,
    recent: Annotated[int, typer.Option("--recent", min=0, metavar="TOKENS", help="Most recent tokens always attended, in tokens.")] = DEFAULT_RECENT_TOKENS,
    dlm: Annotated[Optional[str], typer.Option("--dlm", metavar="DLM", help="The head that does retrieval: a retrieval-head .safetensors file (from `specontext distill`) or a smaller draft model of the same tokenizer (HF directory or GGUF). Default: the model's own layer 0, inaccurate on long contexts.")] = None,
    target_file: Annotated[Optional[Path], typer.Option("--target-file", metavar="FILE", help="A target TOML file instead of a built-in target.")] = None,
    prompt_len: Annotated[Optional[str], typer.Option("--prompt-len", metavar="TOKENS", help="Expected prompt length, in tokens (131072, 128k); sets the initial residency.")] = None,
    level: Annotated[str, typer.Option("--level", metavar="head|batch", help="Selection level: 'head' picks tokens per KV-head group (the paper's; a --dlm must map its KV heads onto the LLM's), 'batch' one shared set per request (any geometry).")] = "head",
    selection_overlap: Annotated[float, typer.Option("--selection-overlap", metavar="F", help="Expected share of a step's selected rows already selected at the previous step (paper: over 0.8; measure yours with benchmarks/measure_overlap.py); elastic loading copies the rest.")] = 0.8,
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
            _one_line_warnings():
        plan = driver.compile_model(model, target, max_len_tokens, batch=parse_batch(batch), budget=budget,
                             sink_tokens=sinks, recent_tokens=recent, out=out_dir, dlm=dlm,
                             target_file=str(target_file) if target_file else None,
                             prompt_len=prompt_tokens, selection_overlap=selection_overlap, level=level,
                             progress=progress)
    if as_json:
        from specontext_compiler.report import plan_summary_json
        typer.echo(_strict_json(plan_summary_json(plan)))
        return
    console = _out()
    console.print(_compile_summary(plan, progress.stage_s))
    console.print(f"[dim]full report: specontext inspect {plan.directory}[/dim]")


# -- inspect, targets ---------------------------------------------------------------------------
@app.command("inspect")
@_edge
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
        typer.echo(_strict_json(report.plan_summary_json(plan)))
    else:
        console = _out()
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
@_edge
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
        typer.echo(_strict_json(_targets_json(targets)))
        return
    console = _out()
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


# -- run, eval ----------------------------------------------------------------------------------
class _StreamPrinter:
    """The engine's stream callback (request index, token id): prints request 0's new text.

    It decodes the whole sequence so far and prints the new suffix, since one token can be part
    of a multi-byte character that only decodes with its neighbours."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, index: int, token: int | str) -> None:
        if index != 0:
            return
        if isinstance(token, str) or self.tokenizer is None:
            sys.stdout.write(str(token) if isinstance(token, str) else f"{token} ")
        else:
            self.ids.append(int(token))
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            sys.stdout.write(text[len(self.printed):])
            self.printed = text
        sys.stdout.flush()


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    text = getattr(output, "text", None)
    return text if text is not None else " ".join(map(str, getattr(output, "token_ids", [])))


@app.command("run")
@_edge
def run_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt text.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR", help="Local HF model directory or .gguf file (or 'smollm2'); default: the model the plan was compiled from.")] = None,
    dlm: Annotated[Optional[Path], typer.Option("--dlm", metavar="PATH", help="Distilled model directory or retrieval-head .safetensors file, if the plan needs one.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, metavar="N", help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, metavar="T", help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, metavar="P", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as a user message in the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are generated.")] = True,
) -> None:
    """Generate text for one prompt with a compiled plan bound to local weights.

    Example: specontext run plans/smollm2-a100 --prompt "Hello" --chat
    """
    from specontext_compiler.dlm import head_for_plan
    from specontext_compiler.runtime.plan import load_plan
    from specontext_compiler.serve import resolve_model
    plan = load_plan(plan_dir)
    engine = plan.bind(resolve_model(plan, model), dlm=head_for_plan(str(dlm), plan) if dlm else None)
    tokenizer = getattr(engine, "tokenizer", None)
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise SpecontextError("--chat needs the model's chat template, and its tokenizer has none; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    printer = _StreamPrinter(tokenizer) if stream else None
    outputs = engine.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stream=printer)
    if not stream:
        sys.stdout.write(_output_text(outputs[0]))
    sys.stdout.write("\n")


@app.command("serve")
@_edge
def serve_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile`.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR", help="Local HF model directory or .gguf file (or 'smollm2'); default: the model the plan was compiled from.")] = None,
    dlm: Annotated[Optional[Path], typer.Option("--dlm", metavar="PATH", help="Distilled model directory or retrieval-head .safetensors file, if the plan needs one.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve a plan over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

    Example: specontext serve plans/smollm2-a100 --port 8000
    """
    from specontext_compiler.serve import serve
    serve(plan_dir, model, host, port, dlm=str(dlm) if dlm else None)


@app.command("eval")
@_edge
def eval_cmd(
    plan_dir: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan directory written by `specontext compile` from a local model.")],
    task: Annotated[list[str], typer.Option("--task", metavar="TASK", help="recall (attention mass kept vs full attention) or passkey; repeat for both.")],
    length: Annotated[Optional[list[str]], typer.Option("--length", metavar="TOKENS", help="Passkey context length in tokens (4096, 4k); repeatable. Default: 2k, 4k, 8k.")] = None,
    budget: Annotated[Optional[list[int]], typer.Option("--budget", metavar="TOKENS", help="Recall budget in selected tokens; repeatable. Default: 256 to 2048.")] = None,
    question: Annotated[str, typer.Option("--question", metavar="MODE", help="Passkey: 'prompt' (the question is part of the densely prefilled prompt, as `specontext run` serves it) or 'decode' (its tokens are sparse decode steps; stricter).")] = "prompt",
    keys: Annotated[int, typer.Option("--keys", metavar="N", help="Passkey keys (cases) per length and depth.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Measure a plan's token selection on the plan's own model, offline (CPU is fine).

    Example: specontext eval plans/smollm2-a100 --task recall --task passkey --length 4k
    """
    from specontext_compiler.eval import runner
    unknown = sorted(set(task) - {"recall", "passkey"})
    if unknown:
        raise SpecontextError(f"--task {', '.join(unknown)} is not a task; choose recall or passkey")
    from specontext_compiler.eval.passkey import QUESTION_MODES
    if question not in QUESTION_MODES:            # before the plan and model load
        raise SpecontextError(f"--question {question} is not a mode; choose {' or '.join(QUESTION_MODES)}")
    if keys < 1:
        raise SpecontextError(f"--keys {keys} must be a positive integer")
    options: dict[str, Any] = {}
    if length:
        options["lengths"] = [parse_tokens(text, "--length") for text in length]
    if budget:
        bad = [b for b in budget if b < 1]
        if bad:
            raise SpecontextError(f"--budget {bad[0]} must be a positive number of selected tokens")
        options["budgets"] = budget
    options.update(passkey_question=question, passkey_keys=keys)
    result = runner.run_eval_for_plan(plan_dir, task, **options)
    if as_json:
        typer.echo(runner.to_json(result))
    else:
        runner.render_table(result, _out())


# -- distill ------------------------------------------------------------------------------------
def _check_distill_options(out: Path, **counts: int) -> None:
    """Refuse bad input before the (slow) model load: counts must be positive, out writable."""
    for option, value in counts.items():
        if value < 1:
            raise SpecontextError(f"--{option.replace('_', '-')} {value} must be a positive integer")
    if out.suffix != ".safetensors":
        raise SpecontextError(f"output {out} must end in .safetensors (how --dlm recognizes a head file)")
    if not out.parent.is_dir():
        raise SpecontextError(f"output directory {out.parent} does not exist; create it first")
    from specontext_compiler.runtime.retrieval_head import RetrievalHead
    if out.exists() and not (out.is_file() and RetrievalHead.is_head_file(out)):
        raise SpecontextError(f"refusing to write the head to {out}: it exists and is not a specontext "
                              "retrieval head; choose a new -o path (only a head file is replaced)")


def _layer_list(text: str, option: str) -> tuple[int, ...]:
    """'19-24' or '19,21,23' -> layer indices; anything else is a one-line error."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SpecontextError(f"{option} {text!r}: write a range such as 19-24 or a list such as 19,21,23") from None
    if not layers or min(layers) < 0:
        raise SpecontextError(f"{option} {text!r} names no layer; write a range such as 19-24")
    return layers


def _save_atomically(data: bytes, out: Path) -> None:
    """Write the file beside `out`, then rename: a crash never leaves a half-written head file."""
    import os
    import tempfile
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(handle)
    try:
        Path(temporary).write_bytes(data)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _teacher_layers_option(text: str) -> tuple[int, ...] | str | None:
    """--teacher-layers: 'auto' (chosen from the model's attention), 'all', or a range or list."""
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    return _layer_list(text, "--teacher-layers")


def _distill_device(device: Optional[str]) -> str:
    """--device: cuda when a GPU is present, else cpu; cuda without a GPU is a one-line error."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise SpecontextError(f"--device {device!r}: choose cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecontextError("--device cuda: torch sees no GPU here; use --device cpu")
    return device


class _DistillProgress:
    """One rich bar per distillation stage; notes (validation lines) print above the bars."""

    LABELS = {"layers": "choosing teacher layers", "teacher": "teacher forward", "training": "training"}

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)
        if note:
            self.progress.console.print(f"[dim]{note}[/dim]")


def _distill_summary(report: dict, out: Path) -> Table:
    recall_keys = [key for key in report["after"] if key.startswith("recall@")]
    rows = [("head", str(out)),
            ("source", report["source"]),
            ("params", f"{report['params']:,} (feature layers {report['feature_layers']})"),
            ("data", f"{report['train_sequences']} training + {report['validation_sequences']} validation "
                     f"sequences of {report['seq_len']} tokens, {report['epochs']} epochs"),
            ("validation loss", f"{report['before']['loss']:.4f} -> {report['after']['loss']:.4f}")]
    rows += [(f"validation {key}", f"{report['before'][key]:.3f} -> {report['after'][key]:.3f}")
             for key in recall_keys]
    if report.get("teacher_layers"):
        chosen = " (auto: far copy score)" if report.get("teacher_layer_choice") else ""
        rows.append(("teacher layers", ", ".join(map(str, report["teacher_layers"])) + chosen))
    if report.get("teacher_layer_choice"):
        scores = report["teacher_layer_choice"]["scores"]
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:6]
        rows.append(("copy score, best layers", ", ".join(f"{i}: {scores[i]:.3f}" for i in best)))
    if report.get("loss_level", "head") != "head":
        rows.append(("loss", f"per {report['loss_level']}"))
    rows.append(("time", f"choosing layers {report['choose_layers_s']:.1f} s, teacher {report['collect_s']:.1f} s, "
                         f"training {report['train_s']:.1f} s on {report['device']}"))
    return _key_value_table(rows)


@app.command("distill")
@_edge
def distill_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="'smollm2', a local HF model directory or a GGUF file: the LLM to distill from.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="HEAD.safetensors", help="Retrieval-head file to write (an existing head is replaced atomically, any other file is refused); pass it to --dlm.")],
    sequences: Annotated[int, typer.Option("--sequences", metavar="N", help="Training sequences (one in 8 held out for validation).")] = 48,
    seq_len: Annotated[int, typer.Option("--seq-len", metavar="TOKENS", help="Length of each training sequence, in tokens.")] = 2048,
    epochs: Annotated[int, typer.Option("--epochs", metavar="E", help="Passes over the training sequences.")] = 8,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="K", help="CPU threads for torch. Default: torch's choice.")] = None,
    teacher: Annotated[str, typer.Option("--teacher", metavar="mean|max", help="How the LLM's layers combine into the target distribution.")] = "mean",
    recall_documents: Annotated[bool, typer.Option("--recall-documents", help="Mix in documents whose facts are asked about later.")] = False,
    teacher_layers: Annotated[str, typer.Option("--teacher-layers", metavar="auto|all|A-B|A,B,...", help="LLM layers that make the target: auto (the layers that look up far context on the training text; scores kept in the head file), all, or a range/list such as 19-24.")] = "auto",
    loss: Annotated[str, typer.Option("--loss", metavar="head|group", help="Fit each query head to the LLM head of its index, or each selection group's mixture of heads to the group's target.")] = "head",
    device: Annotated[Optional[str], typer.Option("--device", metavar="cuda|cpu", help="Where the teacher and training run (bf16 autocast on cuda). Default: cuda when a GPU is present.")] = None,
) -> None:
    """Distill a fused retrieval head from MODEL's own attention (CPU is fine; minutes for SmolLM2).

    Example: specontext distill smollm2 -o heads/smollm2-fused.safetensors --sequences 48 --epochs 8
    """
    _check_distill_options(out, sequences=sequences, seq_len=seq_len, epochs=epochs,
                           **({"threads": threads} if threads is not None else {}))
    from specontext_compiler.distill.teacher import AGGREGATES
    if teacher not in AGGREGATES:        # before the model load, which takes the time
        raise SpecontextError(f"--teacher {teacher!r}: choose {' or '.join(AGGREGATES)}")
    from specontext_compiler.distill.train import LOSS_LEVELS
    if loss not in LOSS_LEVELS:
        raise SpecontextError(f"--loss {loss!r}: choose {' or '.join(LOSS_LEVELS)}")
    layers = _teacher_layers_option(teacher_layers)
    device = _distill_device(device)
    import torch

    from specontext_compiler.distill import distill_retrieval_head
    from specontext_compiler.distill.head_file import head_bytes, metadata_record
    from specontext_compiler.smollm2 import load_causal_lm
    if threads is not None:
        torch.set_num_threads(threads)
    llm, tokenizer, _ = load_causal_lm(model)
    llm.to(device)
    name = Path(model.rstrip("/")).name or model
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True, highlight=False), transient=False) as bar:
        head, report = distill_retrieval_head(llm, tokenizer, sequences=sequences, seq_len=seq_len, epochs=epochs,
                                              teacher_aggregate=teacher, recall_documents=recall_documents,
                                              teacher_layers=layers, loss_level=loss, name=name,
                                              progress=_DistillProgress(bar))
    _save_atomically(head_bytes(head, metadata_record(report)), out)
    console = _out()
    console.print(_distill_summary(report, out))
    console.print(f"[dim]use it: specontext compile {model} --dlm {out}[/dim]")


def main() -> None:
    """Console-script entry point (`specontext`, `python -m specontext_compiler`)."""
    if not os.environ.get("SPECONTEXT_DEBUG"):        # a warning is one line too, like an error
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    app(prog_name="specontext")

"""`specontext distill`: train a retrieval head from a model's own attention, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from specontext_compiler.cli.app import app, edge, key_value_table, out_console, strict_json
from specontext_compiler.errors import SpecontextError


def _check_distill_options(out: Optional[Path], **counts: int) -> None:
    """Refuse bad input before the (slow) model load: counts must be positive, out writable."""
    for option, value in counts.items():
        if value < 1:
            raise SpecontextError(f"--{option.replace('_', '-')} {value} must be a positive integer")
    if out is None:
        return
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
        scored = [i for i, score in enumerate(scores) if score is not None]     # None: a sliding-window layer
        best = sorted(scored, key=lambda i: -scores[i])[:6]
        rows.append(("copy score, best layers", ", ".join(f"{i}: {scores[i]:.3f}" for i in best)))
    if report.get("loss_level", "head") != "head":
        rows.append(("loss", f"per {report['loss_level']}"))
    rows.append(("time", f"choosing layers {report['choose_layers_s']:.1f} s, teacher {report['collect_s']:.1f} s, "
                         f"training {report['train_s']:.1f} s on {report['device']}"))
    return key_value_table(rows)


@app.command("distill")
@edge
def distill_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="'smollm2', a local HF model directory or a GGUF file: the LLM to distill from.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="HEAD.safetensors", help="Retrieval-head file to write (an existing head is replaced atomically, any other file is refused); pass it to --dlm. Default: the head cache (`specontext heads`), where a compile of MODEL without --dlm finds it.")] = None,
    sequences: Annotated[int, typer.Option("--sequences", metavar="N", help="Training sequences (one in 8 held out for validation).")] = 48,
    seq_len: Annotated[int, typer.Option("--seq-len", metavar="TOKENS", help="Length of each training sequence, in tokens.")] = 2048,
    epochs: Annotated[int, typer.Option("--epochs", metavar="E", help="Passes over the training sequences.")] = 8,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="K", help="CPU threads for torch. Default: torch's choice.")] = None,
    teacher: Annotated[str, typer.Option("--teacher", metavar="mean|max", help="How the LLM's layers combine into the target distribution.")] = "mean",
    recall_documents: Annotated[bool, typer.Option("--recall-documents", help="Mix in documents whose facts are asked about later.")] = False,
    teacher_layers: Annotated[str, typer.Option("--teacher-layers", metavar="auto|all|A-B|A,B,...", help="LLM layers that make the target: auto (the layers that look up far context on the training text; scores kept in the head file), all, or a range/list such as 19-24.")] = "auto",
    loss: Annotated[str, typer.Option("--loss", metavar="head|group", help="Fit each selection group's mixture of heads to the group's target (the default: with the automatic teacher layers it found the 8k passkey in 35 of 45 cases, full attention 36; benchmarks/ACCURACY.md), or each query head to the LLM head of its index.")] = "group",
    device: Annotated[Optional[str], typer.Option("--device", metavar="cuda|cpu", help="Where the teacher and training run (bf16 autocast on cuda). Default: cuda when a GPU is present.")] = None,
) -> None:
    """Distill a fused retrieval head from MODEL's own attention (CPU is fine; minutes for SmolLM2).

    Without -o the head goes to the head cache, where `specontext compile MODEL` finds it.

    Example: specontext distill smollm2 -o heads/smollm2-fused.safetensors --sequences 48 --epochs 8
    """
    _check_distill_options(out, sequences=sequences, seq_len=seq_len, epochs=epochs,
                           **({"threads": threads} if threads is not None else {}))
    cache_key = None
    if out is None:                     # the cache's key, before the slow load (and its errors first)
        from specontext_compiler.distill.default_head import fingerprint_of
        cache_key = fingerprint_of(model)
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
    out, use = _save_head(head_bytes(head, metadata_record(report)), model, out, cache_key)
    console = out_console()
    console.print(_distill_summary(report, out))
    console.print(f"[dim]use it: {use}[/dim]")


def _save_head(data: bytes, model: str, out: Optional[Path], cache_key) -> tuple[Path, str]:
    """Write the head to -o, or into the head cache under the model's fingerprint; (path, how to use it)."""
    from specontext_compiler.distill.head_cache import store_head, write_file_atomically
    if cache_key is None:
        write_file_atomically(data, out)
        return out, f"specontext compile {model} --dlm {out}"
    fingerprint, weights, cache_name = cache_key
    path = store_head(data, fingerprint, cache_name)
    return path, f"specontext compile {weights} (no --dlm: the cached head is found by the model's fingerprint)"


@app.command("heads")
@edge
def heads_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the cached heads as JSON.")] = False,
) -> None:
    """List the distilled retrieval heads in the cache (what `specontext distill MODEL` without -o
    makes and `specontext compile MODEL` without --dlm uses), newest first.

    Example: specontext heads
    """
    from specontext_compiler.distill.head_cache import heads_dir, list_heads
    from specontext_compiler.head_info import recall_text
    heads = list_heads()
    if as_json:
        typer.echo(strict_json(heads))
        return
    if not heads:
        out_console().print(f"no cached heads in {heads_dir()}; make one with `specontext distill MODEL`")
        return
    table = Table(box=None, pad_edge=False, header_style="bold cyan", collapse_padding=True)
    for header in ("model", "fingerprint", "teacher layers", "recall", "size", "file"):
        table.add_column(header, overflow="fold" if header == "file" else "ellipsis")
    for head in heads:
        layers = ", ".join(map(str, head["teacher_layers"])) if head["teacher_layers"] else "all"
        table.add_row(str(head["model"]), head["fingerprint"], layers, recall_text(head),
                      f"{head['bytes'] / 2**20:.1f} MiB", head["path"])
    out_console().print(table)


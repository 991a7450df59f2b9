"""`specontext eval`: accuracy of token-selection methods on a real model, offline.

run_eval loads the model (HF directory, GGUF file or "smollm2"), extracts the retrieval head
(a DLM, or "self:N" from the LLM's own layer N), and runs the tasks: attention recall on long
docstring prose (every method, every budget, plus head-layer alternatives) and passkey retrieval.
render_table prints rich tables; to_json the whole result.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specontext_compiler.errors import SpecontextError
from specontext_compiler.eval.methods import METHODS

TASKS = ("recall", "passkey")


@dataclass
class EvalResult:
    """Everything one eval run measured; `meta` says on what, with which head and settings."""

    meta: dict
    recall: dict = field(default_factory=dict)          # method -> budget -> [per-layer recall]
    head_layers: dict = field(default_factory=dict)     # "self:N" -> budget -> mean spec-head recall
    passkey: list = field(default_factory=list)         # records from passkey.passkey_cases

    def recall_mean(self, method: str, budget: int) -> float:
        per_layer = self.recall[method][budget]
        return sum(per_layer) / len(per_layer)

    def passkey_accuracy(self, method: str, length: int, budget: int | None) -> float:
        rows = [r for r in self.passkey if r["method"] == method and r["length"] == length
                and (method == "full" or r["budget"] == budget)]
        return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")


def run_eval(model_dir_or_gguf, *, tasks=TASKS, budgets=(256, 512, 1024, 2048), lengths=(2048, 4096, 8192),
             depths=(0.1, 0.3, 0.5, 0.7, 0.9), methods=METHODS, head_layer: int = 0, dlm=None,
             passkey_budgets=(1024, 2048), recall_length: int = 8192, recall_queries: int = 16,
             compare_head_layers=(1, 2, 5), sink: int = 1, recent: int = 0, page_size: int = 16,
             seed: int = 0, threads: int | None = None, show_progress: bool = True) -> EvalResult:
    """Run the tasks; budgets for recall, passkey_budgets for passkey (each is W - sink - recent)."""
    import torch
    from specontext_compiler.dlm import extract_retrieval_head
    from specontext_compiler.eval.passkey import passkey_cases
    from specontext_compiler.eval.recall import attention_recall
    from specontext_compiler.eval.text import long_text_ids, python_version
    from specontext_compiler.smollm2 import load_causal_lm

    unknown = set(tasks) - set(TASKS) or set(methods) - set(METHODS)
    if unknown:
        raise SpecontextError(f"unknown eval task or method {sorted(unknown)}; choose from {TASKS} / {METHODS}")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, hf_dir = load_causal_lm(model_dir_or_gguf)
    head, report = extract_retrieval_head(dlm or f"self:{head_layer}", model, llm=model)
    meta = {"model": str(model_dir_or_gguf), "hf_dir": str(hf_dir), "head": report,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(torch),
            "python": python_version(), "settings": {
                "tasks": list(tasks), "budgets": list(budgets), "passkey_budgets": list(passkey_budgets),
                "lengths": list(lengths), "depths": list(depths), "methods": list(methods),
                "recall_length": recall_length, "recall_queries": recall_queries, "sink": sink,
                "recent": recent, "page_size": page_size, "seed": seed}}
    result = EvalResult(meta=meta)
    with _progress(show_progress) as bar:
        if "recall" in tasks:
            ids = long_text_ids(tokenizer, min(recall_length, model.config.max_position_embeddings))
            task = bar.add_task("attention recall", total=recall_queries * (1 + len(compare_head_layers)))
            step = lambda: bar.advance(task)     # noqa: E731
            result.recall = attention_recall(model, head, ids, budgets=budgets, methods=methods, sink=sink,
                                             recent=recent, queries=recall_queries, page_size=page_size,
                                             seed=seed, progress=step)
            for layer in compare_head_layers:
                other, _ = extract_retrieval_head(f"self:{layer}", model, llm=model)
                got = attention_recall(model, other, ids, budgets=budgets, methods=("spec-head",), sink=sink,
                                       recent=recent, queries=recall_queries, seed=seed, progress=step)
                result.head_layers[f"self:{layer}"] = {b: sum(v) / len(v) for b, v in got["spec-head"].items()}
            result.head_layers[f"self:{head_layer}"] = {b: result.recall_mean("spec-head", b)
                                                        for b in budgets} if "spec-head" in methods else {}
        if "passkey" in tasks:
            task = bar.add_task("passkey", total=len(lengths) * len(depths))
            result.passkey = passkey_cases(model, tokenizer, head, lengths=lengths, depths=depths,
                                           budgets=passkey_budgets, methods=methods, sink=sink, recent=recent,
                                           page_size=page_size, seed=seed, progress=lambda: bar.advance(task))
    return result


def run_eval_for_plan(plan_dir, tasks=TASKS, **options) -> EvalResult:
    """run_eval on a compiled plan's model, with the plan's budget / sink / recent as the passkey budget."""
    from specontext_compiler.runtime.plan import load_plan
    plan = load_plan(plan_dir)
    source = plan.model.get("source")
    if not source:
        raise SpecontextError(f"plan {plan_dir} records no model.source; recompile it from a model directory or GGUF")
    workload = plan.workload
    options.setdefault("sink", int(workload.get("sink_tokens", 1)))
    options.setdefault("recent", int(workload.get("recent_tokens", 0)))
    if workload.get("budget"):
        options.setdefault("passkey_budgets", (int(workload["budget"]),))
    layer = plan.retrieval_head.get("layer")
    if layer is not None and str(plan.retrieval_head.get("source", "self")).startswith("self"):
        options.setdefault("head_layer", int(layer))
    return run_eval(source, tasks=tasks, **options)


def to_json(result: EvalResult) -> str:
    """The whole result as JSON (budgets become string keys)."""
    return json.dumps(asdict(result), indent=1, default=str)


def _machine(torch) -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}"


def _progress(show: bool):
    from rich.progress import Progress
    return Progress(disable=not show, transient=True)


def render_table(result: EvalResult, console=None) -> None:
    """Print the recall, head-layer and passkey tables with rich."""
    from specontext_compiler.eval.tables import recall_table, head_layer_table, passkey_table
    from rich.console import Console
    console = console or Console()
    for table in (recall_table(result), head_layer_table(result), passkey_table(result)):
        if table is not None:
            console.print(table)


def load_json(path: str | Path) -> EvalResult:
    """Read a result written with to_json (budget keys back to int)."""
    data = json.loads(Path(path).read_text())
    recall = {m: {int(b): v for b, v in per.items()} for m, per in data["recall"].items()}
    layers = {h: {int(b): v for b, v in per.items()} for h, per in data["head_layers"].items()}
    return EvalResult(meta=data["meta"], recall=recall, head_layers=layers, passkey=data["passkey"])

"""`specontext eval`: accuracy of token-selection methods on a real model, offline.

run_eval loads the model (HF directory, GGUF file or "smollm2"), builds the retrieval head (a DLM,
"self:N" from the LLM's own layer N, or "self-prefix:N" behind the LLM's first N layers) and any
heads to compare, and runs the tasks: attention recall on long docstring prose (every method,
every budget; spec-head for the compared heads) and passkey retrieval.
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
from specontext_compiler.eval.text import long_text_ids, python_version
from specontext_compiler.runtime.plan_records import DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS

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
             head: str | None = None, compare_heads=(), passkey_budgets=(1024, 2048),
             recall_length: int = 8192, recall_queries: int = 16, compare_head_layers=(), sink: int = DEFAULT_SINK_TOKENS,
             recent: int = DEFAULT_RECENT_TOKENS, page_size: int = 16, seed: int = 0, threads: int | None = None,
             passkey_question: str = "prompt", passkey_keys: int = 1, show_progress: bool = True) -> EvalResult:
    """Run the tasks; budgets for recall, passkey_budgets for passkey (each is W - sink - recent).

    The main head is `dlm` (a DLM path), else `head` ("self:N" or "self-prefix:N"), else
    "self:{head_layer}". compare_heads (names) and compare_head_layers ("self:N") are scored too:
    spec-head recall, and both spec-* methods on the passkey, sharing each prefill.
    passkey_question: "prompt" (the question is part of the densely prefilled prompt, as the engine
    serves it) or "decode" (its tokens are sparse decode steps); passkey_keys: keys per depth.
    """
    import torch
    from specontext_compiler.eval.prefix_head import make_head
    from specontext_compiler.smollm2 import load_causal_lm

    _check_options(tasks, methods, passkey_question, passkey_keys, (*budgets, *passkey_budgets))
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, hf_dir = load_causal_lm(model_dir_or_gguf)
    main_name = str(dlm) if dlm else head or f"self:{head_layer}"
    main = _main_head(model, dlm) if dlm else make_head(model, main_name)
    others = {n: make_head(model, n) for n in [*compare_heads, *(f"self:{n}" for n in compare_head_layers)]
              if n != main_name}
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    meta = {"model": str(model_dir_or_gguf), "hf_dir": str(hf_dir), "head_name": main_name,
            "heads": {n: _param_report(h, total) for n, h in {main_name: main, **others}.items()},
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(torch),
            "python": python_version(), "settings": {
                "tasks": list(tasks), "budgets": list(budgets), "passkey_budgets": list(passkey_budgets),
                "lengths": list(lengths), "depths": list(depths), "methods": list(methods),
                "recall_length": recall_length, "recall_queries": recall_queries, "sink": sink,
                "recent": recent, "page_size": page_size, "seed": seed,
                "passkey_question": passkey_question, "passkey_keys": passkey_keys}}
    result = EvalResult(meta=meta)
    with _progress(show_progress) as bar:
        if "recall" in tasks:
            _recall(result, model, tokenizer, main, others, bar, budgets=budgets, methods=methods, sink=sink,
                    recent=recent, queries=recall_queries, page_size=page_size, seed=seed,
                    length=min(recall_length, model.config.max_position_embeddings))
        if "passkey" in tasks:
            from specontext_compiler.eval.passkey import passkey_cases
            task = bar.add_task("passkey", total=len(lengths) * len(depths) * passkey_keys)
            result.passkey = passkey_cases(model, tokenizer, main, lengths=lengths, depths=depths,
                                           budgets=passkey_budgets, methods=methods, sink=sink, recent=recent,
                                           page_size=page_size, seed=seed, extra_heads=others,
                                           question_mode=passkey_question, keys_per_depth=passkey_keys,
                                           progress=lambda: bar.advance(task))
    return result


def _check_options(tasks, methods, passkey_question: str, passkey_keys: int, budgets) -> None:
    """Refuse unknown tasks, methods or question modes and non-positive counts, before the model loads."""
    from specontext_compiler.eval.passkey import QUESTION_MODES
    unknown = set(tasks) - set(TASKS) or set(methods) - set(METHODS)
    if unknown:
        raise SpecontextError(f"unknown eval task or method {sorted(unknown)}; choose from {TASKS} / {METHODS}")
    if passkey_question not in QUESTION_MODES:
        raise SpecontextError(f"passkey question mode {passkey_question!r} is unknown; choose from {QUESTION_MODES}")
    if passkey_keys < 1:
        raise SpecontextError(f"passkey keys per depth {passkey_keys} must be a positive integer")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise SpecontextError(f"budget {budget!r} must be a positive number of selected tokens")


def _main_head(model, dlm):
    from specontext_compiler.dlm import extract_retrieval_head
    return extract_retrieval_head(dlm, model, llm=model)[0]


def _param_report(head, total: int) -> dict:
    if hasattr(head, "param_report"):
        return head.param_report(total)
    params, with_embedding = head.param_count(include_embedding=False), head.param_count(include_embedding=True)
    return {"head": head.source, "params": params, "params_with_embedding": with_embedding, "model_params": total,
            "reduction": 1 - params / total, "reduction_with_embedding": 1 - with_embedding / total}


def _recall(result: EvalResult, model, tokenizer, main, others: dict, bar, *, budgets, methods, length: int,
            queries: int, **options) -> None:
    """All methods with the main head, spec-head with each other head; one shared capture prefill."""
    import torch
    from specontext_compiler.eval.recall import attention_recall, capture_qk, query_positions
    ids = long_text_ids(tokenizer, length)
    task = bar.add_task("attention recall", total=queries * (1 + len(others)))
    step = lambda: bar.advance(task)     # noqa: E731
    captured = capture_qk(model, torch.tensor([ids]), query_positions(len(ids), queries))
    result.recall = attention_recall(model, main, ids, budgets=budgets, methods=methods, queries=queries,
                                     progress=step, captured=captured, **options)
    for name, other in others.items():
        got = attention_recall(model, other, ids, budgets=budgets, methods=("spec-head",), queries=queries,
                               progress=step, captured=captured, **options)
        result.head_layers[name] = {b: sum(v) / len(v) for b, v in got["spec-head"].items()}
    if "spec-head" in methods:
        result.head_layers[result.meta["head_name"]] = {b: result.recall_mean("spec-head", b) for b in budgets}


def run_eval_for_plan(plan_dir, tasks=TASKS, **options) -> EvalResult:
    """run_eval on a compiled plan's model, with the plan's budget / sink / recent as the passkey budget."""
    from specontext_compiler.runtime.plan import load_plan
    plan = load_plan(plan_dir)
    source = plan.model.source
    if not source:
        raise SpecontextError(f"plan {plan_dir} records no model.source; recompile it from a model directory or GGUF")
    workload = plan.workload
    options.setdefault("sink", workload.sink_tokens)
    options.setdefault("recent", workload.recent_tokens)
    options.setdefault("passkey_budgets", (workload.budget,))
    layer, head_file = plan.retrieval_head.layer, plan.retrieval_head.file
    if layer is not None and plan.retrieval_head.source.startswith("self"):
        options.setdefault("head_layer", int(layer))
    elif head_file and plan.directory is not None:     # a DLM's or a distilled head, stored in the plan
        options.setdefault("head", str(plan.directory / head_file))
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

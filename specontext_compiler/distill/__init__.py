"""Distill a fused retrieval head from an LLM's own attention (paper s.4.1, Eq. 2).

`distill_retrieval_head(model, tokenizer)` builds training text (`corpus`), records the LLM's
attention and hidden states on it (`teacher`), and fits an EAGLE-3 style fused head that starts
from the LLM's layer-0 head (`train`). The result saves with `RetrievalHead.save` and serves as
`--dlm HEAD.safetensors`; `specontext distill` is the command line for it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from specontext_compiler.errors import SpecontextError
from specontext_compiler.runtime.plan_records import DEFAULT_RECENT_TOKENS

RECENT_TOKENS = DEFAULT_RECENT_TOKENS   # the always-attended recent window the teacher leaves out
QUERIES_PER_SEQUENCE = 256
MIN_CONTEXT = 64            # a query needs this many selectable keys to teach anything
VALIDATION_FRACTION = 8     # one sequence in 8 is held out (6 of the default 48)


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/middle/high layers (outputs of 2, L//2, L-3) as hidden-state indices."""
    layers = (3, num_layers // 2 + 1, num_layers - 2)
    if not layers[0] < layers[1] < layers[2]:
        raise SpecontextError(f"a model with {num_layers} layers is too shallow for the default feature "
                              "layers (3, L//2+1, L-2); pass feature_layers")
    return layers


Progress = Callable[[str, int, int, str], None]     # (stage, done, total, note)


def distill_retrieval_head(model, tokenizer, *, sequences: int = 48, seq_len: int = 2048,
                           feature_layers: tuple[int, ...] | None = None, epochs: int = 8, lr: float = 3e-3,
                           seed: int = 0, progress: Progress | None = None,
                           name: str | None = None, queries: int = QUERIES_PER_SEQUENCE,
                           recent: int = RECENT_TOKENS, teacher_aggregate: str = "mean",
                           recall_documents: bool = False, teacher_layers: tuple[int, ...] | str | None = "auto",
                           loss_level: str = "group"):
    """(fused RetrievalHead on the CPU, report) distilled from an HF causal LM's attention on stdlib
    prose, on the model's own device (bf16 autocast on CUDA; move the model first).

    feature_layers: HF output_hidden_states indices the head reads (default_feature_layers).
    name: the model's name in the head's source ("distilled:<name>"); default: the model's path.
    progress(stage, done, total, note): called as each stage ("layers", "teacher", "training")
    advances; note is a line to show (a validation result) or "".
    teacher_aggregate: "mean" or "max" over layers (teacher.py); recall_documents: mix in
    documents with facts asked about later (corpus.py). Both defaults scored best on SmolLM2 at
    budgets 256-1024 (benchmarks/ACCURACY.md). teacher_layers: the LLM layers the teacher
    aggregates: "auto" (layer_choice: the layers that look up far context on this text; the
    scores go into report["teacher_layer_choice"]), None for all, or indices; on a model with
    sliding-window layers (Gemma-3) only its global layers, the ones that select, qualify. loss_level: "head"
    fits each query head to the LLM head of its index, "group" each selection group's mixture of
    heads (train.cross_entropy), the default: on SmolLM2 with the automatic teacher layers it found
    the 8k passkey in 35 of 45 cases against full attention's 36 (benchmarks/ACCURACY.md).
    """
    import torch

    from specontext_compiler.distill import corpus, layer_choice, teacher

    config = model.config
    layers = tuple(feature_layers) if feature_layers is not None else default_feature_layers(
        config.num_hidden_layers)
    _check_arguments(config, sequences=sequences, seq_len=seq_len, epochs=epochs, lr=lr,
                     feature_layers=layers, teacher_layers=teacher_layers, loss_level=loss_level)
    report_progress = progress or (lambda stage, done, total, note="": None)
    started = time.perf_counter()
    texts = corpus.training_sequences(tokenizer, sequences, seq_len, seed, recall_documents=recall_documents)
    choice = None
    if teacher_layers == "auto":
        probe = [torch.tensor(ids) for ids, _ in texts[:layer_choice.PROBE_SEQUENCES]]
        choice = layer_choice.auto_teacher_layers(
            model, probe, recent, progress=lambda done, total: report_progress("layers", done, total, ""))
        teacher_layers = tuple(choice["layers"])
    elif teacher_layers is None:
        teacher_layers = _all_selecting_layers(config)
    choose_s = time.perf_counter() - started
    samples = _teacher_samples(model, texts, layers, teacher_layers, teacher_aggregate, seq_len=seq_len,
                               queries=queries, recent=recent, seed=seed, progress=report_progress)
    collect_s = time.perf_counter() - started
    head, history = _train(model, samples, layers, epochs=epochs, lr=lr, seed=seed, recent=recent,
                           loss_level=loss_level, progress=report_progress)
    head.source, head.layer = f"distilled:{name or _model_name(model)}", 0
    held_out = max(1, sequences // VALIDATION_FRACTION)
    report = {"source": head.source, "params": head.param_count(), "feature_layers": list(layers),
              "sequences": sequences, "teacher": teacher_aggregate, "recall_documents": recall_documents,
              "teacher_layers": list(teacher_layers) if teacher_layers is not None else None,
              "teacher_layer_choice": choice, "loss_level": loss_level,
              "train_sequences": sequences - held_out, "device": str(teacher.model_device(model)),
              "validation_sequences": held_out, "seq_len": seq_len, "epochs": epochs, "lr": lr,
              "before": history[0], "after": history[-1], "history": history,
              "choose_layers_s": choose_s, "collect_s": collect_s - choose_s,
              "train_s": time.perf_counter() - started - collect_s}
    return head, report


def _teacher_samples(model, texts, layers, teacher_layers, aggregate: str, *, seq_len: int, queries: int,
                     recent: int, seed: int, progress: Progress) -> list:
    """One teacher sample per training text: its query positions and the LLM's target distribution."""
    import torch

    from specontext_compiler.distill import teacher
    samples = []
    for index, (ids, must) in enumerate(texts):
        positions = teacher.query_positions(seq_len, queries, must, recent, MIN_CONTEXT, seed + index)
        samples.append(teacher.collect(model, torch.tensor(ids), positions, layers, recent, aggregate,
                                       teacher_layers))
        progress("teacher", index + 1, len(texts), "")
    return samples


def _train(model, samples, feature_layers, *, epochs, lr, seed, recent, loss_level, progress):
    """Fit the fused student (started from the LLM's layer-0 head) on the model's device; the
    trained head comes back on the CPU."""
    from specontext_compiler.distill import teacher, train
    from specontext_compiler.dlm import extract_retrieval_head

    held_out = max(1, len(samples) // VALIDATION_FRACTION)
    base, _ = extract_retrieval_head("self:0", model, llm=model)
    head, history = train.fit(base, samples[:-held_out], samples[-held_out:], feature_layers=feature_layers,
                              epochs=epochs, lr=lr, seed=seed, recent=recent, level=loss_level,
                              device=teacher.model_device(model),
                              progress=lambda done, total, note: progress("training", done, total, note))
    return head.to("cpu"), history


def _all_selecting_layers(config) -> tuple[int, ...] | None:
    """teacher_layers=None ("all"): None when every layer selects, else the global layers only."""
    from specontext_compiler.distill.layer_choice import selecting_layers
    selecting = selecting_layers(config)
    return None if len(selecting) == config.num_hidden_layers else selecting


def _check_arguments(config, *, sequences: int, seq_len: int, epochs: int, lr: float,
                     feature_layers: tuple[int, ...], teacher_layers: tuple[int, ...] | str | None = None,
                     loss_level: str = "head") -> None:
    from specontext_compiler.distill.train import LOSS_LEVELS
    if loss_level not in LOSS_LEVELS:
        raise SpecontextError(f"loss level {loss_level!r}: choose one of {LOSS_LEVELS}")
    if sequences < 2:
        raise SpecontextError(f"sequences={sequences}: need at least 2 (one trains, one validates)")
    if epochs < 1 or lr <= 0:
        raise SpecontextError(f"epochs={epochs}, lr={lr}: both must be positive")
    if seq_len > config.max_position_embeddings:
        raise SpecontextError(f"seq_len={seq_len} exceeds the model's {config.max_position_embeddings} positions")
    if not feature_layers or not all(0 <= i <= config.num_hidden_layers for i in feature_layers):
        raise SpecontextError(f"feature_layers {list(feature_layers)} must be hidden-state indices in "
                              f"0..{config.num_hidden_layers}")
    if teacher_layers == "auto":
        return
    if isinstance(teacher_layers, str):
        raise SpecontextError(f"teacher layers {teacher_layers!r}: give 'auto', None (all) or layer indices")
    if teacher_layers is not None and not (teacher_layers and all(0 <= i < config.num_hidden_layers
                                                                   for i in teacher_layers)):
        raise SpecontextError(f"teacher layers {list(teacher_layers)} must be layer indices in "
                              f"0..{config.num_hidden_layers - 1}")
    from specontext_compiler.distill.layer_choice import selecting_layers
    local = sorted(set(teacher_layers or ()) - set(selecting_layers(config)))
    if local:
        raise SpecontextError(f"teacher layers {local} are sliding-window layers, which keep their window and "
                              f"never select; choose among the global layers {list(selecting_layers(config))}")


def _model_name(model) -> str:
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return Path(path.rstrip("/")).name or getattr(model.config, "model_type", "model")


__all__ = ["distill_retrieval_head", "default_feature_layers"]

"""Plan two models for two GPUs and compare what the compiler chose.

Each plan answers: how many requests fit (batch 'auto'), how many layers keep their full KV on
the GPU at the longest sequence, and the predicted decode throughput there (cost model, not a
measurement). Runs on a laptop: the models are presets (configs only, no weights).

    python examples/compare_plans.py
"""
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import specontext_compiler

# qwen3-8b's config stops at 40960 positions; llama-3.1-8b goes to 128k
MODELS = {"llama-3.1-8b": "128k", "qwen3-8b": "40k"}
TARGETS = ["a100", "h100"]


def main() -> None:
    table = Table(title="SpeContext plans (predicted at max len)", title_justify="left")
    for header in ("model", "target", "max len", "batch", "GPU layers", "step ms", "tok/s"):
        table.add_column(header, justify="left" if header in ("model", "target") else "right")
    with tempfile.TemporaryDirectory() as scratch:
        for model, max_len in MODELS.items():
            for target in TARGETS:
                plan = specontext_compiler.compile(model, target, max_len, batch="auto",
                                                   out=Path(scratch) / f"{model}-{target}")
                last = plan.segments[-1]
                table.add_row(model, plan.target["name"], max_len, str(plan.workload.batch),
                              f"{len(last.gpu_layers)}/{plan.model.num_layers}",
                              f"{last.predicted['step_ms']:.2f}", f"{last.predicted['tokens_per_s']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()

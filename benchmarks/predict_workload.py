"""The latency model's decode throughput over the steps a Table 5 run covered, at its overlap.

    python benchmarks/predict_workload.py benchmarks/results/run22-workload-2k-32k.log

A plan's own tokens/s is for its whole length range at the compile-time overlap (0.8); a run that
stopped at its time limit covered steps 1..N at the overlap it measured. This compiles the plan
again for the run's request count (into a temporary directory), sums the model's step time over
the lengths the run decoded (every 64th step, scaled) at the measured overlap, and prints
measured vs predicted decode tokens/s. Needs PuLP (runs here, not on the GPU machine).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from specontext_compiler.cost_models.plan_prediction import predicted_step
from specontext_compiler.driver import compile_model
from specontext_compiler.runtime.plan import load_plan

SAMPLE_EVERY = 64


def predicted_tokens_per_s(prompt_len: int, new_tokens: int, requests: int, steps: int,
                           overlap: float | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan"
        compile_model("llama-3.1-8b", target="h100", budget=2048, prompt_len=prompt_len,
                      max_len=prompt_len + new_tokens, batch=requests, out=out)
        plan = load_plan(out)
        lengths = range(prompt_len, prompt_len + steps, SAMPLE_EVERY)
        total_ms = sum(predicted_step(plan, n, overlap).step_ms for n in lengths) * steps / len(lengths)
    return requests * steps / (total_ms / 1e3)


def main(paths: list[str]) -> None:
    print("| [in, out] | requests | steps | overlap | measured decode tok/s | predicted tok/s | measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            prompt_len, new_tokens = json.loads(row["workload"])
            predicted = predicted_tokens_per_s(prompt_len, new_tokens, row["requests"], row["steps"],
                                               row.get("selection_overlap"))
            measured = row["decode_tokens_per_s"]
            overlap = row.get("selection_overlap")
            print(f"| {row['workload']} | {row['requests']} | {row['steps']} | "
                  f"{'-' if overlap is None else round(overlap, 3)} | {measured:.1f} | {predicted:.1f} | "
                  f"{measured / predicted:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

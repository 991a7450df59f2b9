"""The latency model's prediction for each measured decode row, with today's target file.

    python benchmarks/predict_measured.py benchmarks/results/run10-specontext.jsonl

A plan records the target it was compiled with; this re-evaluates each measured specontext row's
plan (benchmarks/plans/<method>-<context>) with the current built-in target of that name (its
calibration factors included) at the overlap the row measured, and prints measured vs predicted.
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

from specontext_compiler.cost_models.plan_prediction import predicted_step
from specontext_compiler.cost_models.target import load_target
from specontext_compiler.runtime.plan import load_plan


def main(results: str, plans: str = "benchmarks/plans") -> None:
    print("| context | plan | measured ms | predicted ms | error |\n|---|---|---|---|---|")
    for line in Path(results).read_text().splitlines():
        row = json.loads(line)
        if not row.get("step_ms") or not str(row.get("method", "")).startswith("specontext "):
            continue
        name = f"{row['method'].split()[1]}-{row['context']}"
        plan = load_plan(Path(plans) / name)
        plan.target = asdict(load_target(plan.target["name"]))
        predicted = predicted_step(plan, row["context"], row.get("overlap")).step_ms
        error = predicted / row["step_ms"] - 1
        print(f"| {row['context']} | {name} | {row['step_ms']:.1f} | {predicted:.1f} | {error:+.1%} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

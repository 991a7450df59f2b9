"""Compile time of a preset, stage by stage (goal: under 30 s in all, ILP under 5 s, on 2 cores).

    python benchmarks/bench_compile.py --model llama-3.1-8b --target a100 --max-len 128k
"""
from __future__ import annotations

import argparse
import tempfile
import time

from specontext_compiler import compile_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--target", default="a100")
    parser.add_argument("--max-len", default="128k")
    parser.add_argument("--batch", default="1")
    args = parser.parse_args()
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        plan = compile_model(args.model, args.target, args.max_len, batch=args.batch, out=f"{out}/plan",
                             progress=lambda stage, seconds: marks.append((stage, seconds)))
    total = time.perf_counter() - start
    print(f"\n{args.model} for {args.target}, max-len {args.max_len}, batch {args.batch}: "
          f"plan batch {plan.workload.batch}, solver {plan.solver.get('status')} "
          f"in {plan.solver.get('time_s', 0):.2f} s")
    print("| stage | seconds |\n|---|---|")
    for (stage, begin), (_, end) in zip(marks, marks[1:]):
        print(f"| {stage} | {end - begin:.2f} |")
    print(f"| total (with imports of the stages) | {total:.2f} |")


if __name__ == "__main__":
    main()

"""Fit the step DAG's contention figures on one measured overlap; predict the others (held out).

    python benchmarks/fit_step_dag.py --measured 0.8:19.07,0.9:14.16,0.95:11.47 --fit-on 0.8 \
        --target h200 --set pinned_gather_gbps=33 --set gather_gbps_beside_compute=21.5 \
        --set compute_slowdown_beside_gather=2.0 --batch 11 --offloaded 12 --context 130560
    python benchmarks/fit_step_dag.py --plan benchmarks/plans/sparse-130560 --context 130560 \
        --batch 11 --measured ... --fit-on 0.8,0.95 --fit gather_rate,compute_slowdown

The step is the plan's (its model, workload, target and the residency at --context) or, without
--plan, a Llama-3.1-8B-shape step built here: --offloaded last layers in pinned host memory,
budget --budget. --set overrides target figures before the fit (e.g. the probe's contention
figures). Prints one row per measured point (fit or held out) and the fitted figures as TOML.
Runs on the CPU in seconds; needs no GPU and no PuLP.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace

from specontext_compiler.cost_models.contention_fit import fit
from specontext_compiler.cost_models.latency import step_time
from specontext_compiler.cost_models.plan_prediction import predicted_step
from specontext_compiler.cost_models.target import load_target, override_target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import SpecontextError


def _pairs(text: str) -> list[tuple[float, float]]:
    """'0.8:19.07,0.9:14.16' -> [(0.8, 19.07), (0.9, 14.16)]."""
    return [tuple(float(x) for x in item.split(":")) for item in text.split(",") if item.strip()]


def _predictor(args, target):
    """(predict(target, overlap) -> step ms, the step's description)."""
    if args.plan:
        from specontext_compiler.runtime.plan import load_plan
        plan = load_plan(args.plan)
        if args.batch:
            plan.workload = {**plan.workload, "batch": args.batch}

        def from_plan(t, overlap):
            plan.target = asdict(t)
            return predicted_step(plan, args.context, overlap)
        return (lambda t, o: from_plan(t, o).step_ms), from_plan
    from specontext_compiler.models import resolve_model, spec_from_config
    source = resolve_model(args.model)
    spec = spec_from_config(source.config, source.name)
    work = Workload(max_len=args.context + 512, prompt_len=args.context, batch=args.batch or 1, budget=args.budget)
    layers = range(spec.num_layers - args.offloaded, spec.num_layers)

    def breakdown(t, overlap):
        return step_time(spec, replace(work, selection_overlap=overlap), t, args.context, layers)
    return (lambda t, o: breakdown(t, o).step_ms), breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", required=True, help="overlap:step_ms pairs, comma separated")
    parser.add_argument("--fit-on", default="0.8", help="overlaps to fit on (one per fitted figure)")
    parser.add_argument("--fit", default="gather_rate", help="figures: gather_rate, compute_slowdown, target keys")
    parser.add_argument("--plan", help="plan directory (else a step built from --model and --offloaded)")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--target", default="h200")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--context", type=int, default=130560)
    parser.add_argument("--batch", type=int, default=11)
    parser.add_argument("--offloaded", type=int, default=12)
    parser.add_argument("--budget", type=int, default=2048)
    args = parser.parse_args()
    target = load_target(args.target)
    if args.set:
        target = override_target(target, dict(item.split("=", 1) for item in args.set))
    predict, breakdown = _predictor(args, target)
    try:
        result = fit(predict, target, _pairs(args.measured), args.fit.split(","),
                     [float(x) for x in args.fit_on.split(",")])
    except SpecontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("| overlap | measured ms | model before ms | fitted model ms | error | role | critical path (fitted) |")
    print("|---|---|---|---|---|---|---|")
    for row in result.rows:
        path = breakdown(result.target, row["overlap"]).critical_path
        print(f"| {row['overlap']} | {row['measured_ms']:.2f} | {row['before_ms']:.2f} | {row['after_ms']:.2f} | "
              f"{row['after_ms'] / row['measured_ms'] - 1:+.1%} | {row['role']} | {path} |")
    fitted = result.target
    print(f"\nfitted {', '.join(f'{k} = {v:.4g}' for k, v in result.values.items())}; as target figures:")
    print(f"pinned_gather_gbps = {fitted.pinned_gather_gbps:.2f}\n"
          f"gather_gbps_beside_compute = {fitted.gather_gbps_overlapped:.2f}\n"
          f"compute_slowdown_beside_gather = {fitted.compute_slowdown_beside_gather:.3f}")


if __name__ == "__main__":
    main()

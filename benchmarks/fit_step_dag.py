"""Fit the step DAG's contention figures on one measured step; predict the others (held out).

    python benchmarks/fit_step_dag.py --measured 0.8:19.07,0.9:14.16,0.95:11.47 --fit-on 0.8 \
        --target h200 --set pinned_gather_gbps=33 --set gather_gbps_beside_compute=21.5 \
        --set compute_slowdown_beside_gather=2.0 --batch 11 --offloaded 12 --context 130560 \
        --point benchmarks/plans/sparse-32768,32768,33,0.8,13.45
    python benchmarks/fit_step_dag.py --plan benchmarks/plans/sparse-130560 --context 130560 \
        --batch 11 --measured ... --fit-on 0.8,0.95 --fit gather_rate,compute_slowdown

--measured: one step at several overlaps, labelled by the overlap: the plan's (its model, workload
and residency at --context, re-evaluated with --target) or, without --plan, a Llama-3.1-8B-shape
step built here with the last --offloaded layers in pinned host memory. --point adds a step of
another plan (directory, context, batch, overlap, ms; labelled 'context @ overlap'). --set
overrides target figures before the fit (e.g. a probe's). Prints one row per point (fit or held
out) and the fitted figures as TOML. CPU only, seconds to a minute; needs no GPU and no PuLP.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace

from specontext_compiler.cost_models.contention_fit import Point, fit, overlap_points
from specontext_compiler.cost_models.latency import step_time
from specontext_compiler.cost_models.plan_prediction import predicted_step
from specontext_compiler.cost_models.target import load_target, override_target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import SpecontextError


def _pairs(text: str) -> list[tuple[float, float]]:
    """'0.8:19.07,0.9:14.16' -> [(0.8, 19.07), (0.9, 14.16)]."""
    return [tuple(float(x) for x in item.split(":")) for item in text.split(",") if item.strip()]


def plan_step(directory: str, context: int, batch: int | None):
    """breakdown(target, overlap) of a compiled plan's step at context tokens (its batch, or batch)."""
    from specontext_compiler.runtime.plan import load_plan
    plan = load_plan(directory)
    if batch:
        plan.workload = replace(plan.workload, batch=batch)

    def breakdown(target, overlap):
        plan.target = asdict(target)
        return predicted_step(plan, context, overlap)
    return breakdown


def built_step(model: str, context: int, batch: int, offloaded: int, budget: int):
    """breakdown(target, overlap) of a step built from a preset: the last `offloaded` layers offloaded."""
    from specontext_compiler.models import resolve_model, spec_from_config
    source = resolve_model(model)
    spec = spec_from_config(source.config, source.name)
    work = Workload(max_len=context + 512, prompt_len=context, batch=batch, budget=budget)
    layers = range(spec.num_layers - offloaded, spec.num_layers)
    return lambda target, overlap: step_time(spec, replace(work, selection_overlap=overlap), target, context, layers)


def points_of(args) -> tuple[list[Point], dict]:
    """The measured points, and each label's breakdown(target) for the critical-path column."""
    main = (plan_step(args.plan, args.context, args.batch) if args.plan
            else built_step(args.model, args.context, args.batch, args.offloaded, args.budget))
    points = overlap_points(lambda t, o: main(t, o).step_ms, _pairs(args.measured))
    paths = {p.label: (lambda t, o=float(p.label): main(t, o)) for p in points}
    for text in args.point:
        directory, context, batch, overlap, ms = text.split(",")
        other = plan_step(directory, int(context), int(batch))
        label = f"{context} @ {float(overlap):g}"
        points.append(Point(label, float(ms), lambda t, f=other, o=float(overlap): f(t, o).step_ms))
        paths[label] = lambda t, f=other, o=float(overlap): f(t, o)
    return points, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", required=True, help="overlap:step_ms pairs of the main step, comma separated")
    parser.add_argument("--point", action="append", default=[], metavar="PLAN,CONTEXT,BATCH,OVERLAP,MS",
                        help="a measured step of another plan (repeatable)")
    parser.add_argument("--fit-on", default="0.8", help="labels to fit on, one per figure (0.8, '32768 @ 0.8')")
    parser.add_argument("--fit", default="gather_rate", help="figures: gather_rate, compute_slowdown, target keys")
    parser.add_argument("--plan", help="plan directory of the main step (else one built from --model)")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--target", default="h200", help="built-in name or a .toml file (e.g. a probe's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--context", type=int, default=130560)
    parser.add_argument("--batch", type=int, default=11)
    parser.add_argument("--offloaded", type=int, default=12)
    parser.add_argument("--budget", type=int, default=2048)
    args = parser.parse_args()
    try:
        target = load_target(args.target)
        if args.set:
            target = override_target(target, dict(item.split("=", 1) for item in args.set))
        points, paths = points_of(args)
        result = fit(target, points, args.fit.split(","), [x.strip() for x in args.fit_on.split(",")])
    except SpecontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_result(result, paths)


def print_result(result, paths) -> None:
    print("| point | measured ms | model before ms | fitted model ms | error | role | critical path (fitted) |")
    print("|---|---|---|---|---|---|---|")
    for row in result.rows:
        error = row["after_ms"] / row["measured_ms"] - 1
        print(f"| {row['point']} | {row['measured_ms']:.2f} | {row['before_ms']:.2f} | {row['after_ms']:.2f} | "
              f"{error:+.1%} | {row['role']} | {paths[row['point']](result.target).critical_path} |")
    fitted = result.target
    print(f"\nfitted {', '.join(f'{k} = {v:.4g}' for k, v in result.values.items())}; as target figures:")
    print(f"pinned_gather_gbps = {fitted.pinned_gather_gbps:.2f}\n"
          f"gather_gbps_beside_compute = {fitted.gather_gbps_overlapped:.2f}\n"
          f"compute_slowdown_beside_gather = {fitted.compute_slowdown_beside_gather:.3f}")


if __name__ == "__main__":
    main()

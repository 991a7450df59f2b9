"""Fit a target's copy/compute contention figures to measured decode steps; predict the others.

The step DAG (step_dag.py) prices a step from the target's figures; the ones the datasheet and a
quiet probe cannot give are how fast the runtime's gather really runs and how much it slows the
compute beside it. Given measured steps (a plan at an overlap and a length, its step ms), this
fits one figure per fitted point, so the points left out test the model: the usual use fits on
the 128k plan at overlap 0.8 and holds out 0.9, 0.95 and the 32k plan (benchmarks/fit_step_dag.py).

Figures: "gather_rate" scales the gather's rates alone and beside compute together (keeping the
target's measured ratio); "compute_slowdown" is compute_slowdown_beside_gather; any other name is
a Target field set as is. With two figures on two points, the second is found by an outer
search, the first by bisection inside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from specontext_compiler.cost_models.target import Target
from specontext_compiler.errors import SpecontextError


# search range of each figure (log-spaced): a scale factor, a slowdown, or GB/s for raw rates
RANGES = {"gather_rate": (0.02, 20.0), "compute_slowdown": (1.0, 10.0)}
DEFAULT_RANGE = (0.01, 1e5)
_OUTER_GRID = 24


@dataclass(frozen=True)
class Point:
    """One measured step: a label ('0.8', '32768 @ 0.8'), its step ms, the model's step for a target."""

    label: str
    measured_ms: float
    predict: Callable[[Target], float]


@dataclass(frozen=True)
class FitResult:
    target: Target
    values: dict[str, float]                      # figure -> fitted value
    rows: list[dict]                              # per point: label, measured, before, after, role


def with_figure(target: Target, figure: str, value: float) -> Target:
    """target with one figure set (gather_rate: both gather rates scaled by value)."""
    if figure == "gather_rate":
        return replace(target, pinned_gather_gbps=target.pinned_gather_gbps * value,
                       gather_gbps_beside_compute=target.gather_gbps_overlapped * value)
    if figure == "compute_slowdown":
        return replace(target, compute_slowdown_beside_gather=max(1.0, value))
    if not hasattr(target, figure):
        raise SpecontextError(f"--fit {figure} is not a figure; use gather_rate, compute_slowdown "
                              "or a target key such as gather_gbps_beside_compute")
    return replace(target, **{figure: value})


def _bisect(error: Callable[[float], float], low: float, high: float, steps: int = 40) -> float | None:
    """A root of error in [low, high] by log bisection; None if the ends have the same sign."""
    e_low, e_high = error(low), error(high)
    if e_low == 0:
        return low
    if (e_low > 0) == (e_high > 0):
        return None
    for _ in range(steps):
        mid = math.sqrt(low * high)
        e_mid = error(mid)
        if (e_mid > 0) == (e_low > 0):
            low, e_low = mid, e_mid
        else:
            high = mid
    return math.sqrt(low * high)


def _fit_one(target: Target, figure: str, point: Point) -> float:
    low, high = RANGES.get(figure, DEFAULT_RANGE)
    value = _bisect(lambda v: point.predict(with_figure(target, figure, v)) - point.measured_ms, low, high)
    if value is None:
        reach = sorted(point.predict(with_figure(target, figure, v)) for v in (low, high))
        raise SpecontextError(f"{figure} cannot make the step {point.label} {point.measured_ms} ms: the model "
                              f"reaches {reach[0]:.2f}-{reach[1]:.2f} ms over {low}-{high}; fit another figure")
    return value


def _fit_two(target: Target, figures: list[str], points: list[Point]) -> dict:
    """Outer figure over a log grid (then bisected where the second point's error changes sign)."""
    inner, outer = figures
    low, high = RANGES.get(outer, DEFAULT_RANGE)

    def error(v: float) -> float:
        t = with_figure(target, outer, v)
        t = with_figure(t, inner, _fit_one(t, inner, points[0]))
        return points[1].predict(t) - points[1].measured_ms

    grid = [low * (high / low) ** (k / _OUTER_GRID) for k in range(_OUTER_GRID + 1)]
    errors = []
    for v in grid:
        try:
            errors.append((v, error(v)))
        except SpecontextError:
            continue
    if not errors:
        raise SpecontextError(f"no {outer} in {low}-{high} lets {inner} fit the step {points[0].label}")
    for (a, ea), (b, eb) in zip(errors, errors[1:]):
        if (ea > 0) != (eb > 0):
            best = _bisect(error, a, b, steps=30)
            break
    else:
        best, miss = min(errors, key=lambda ve: abs(ve[1]))
        raise SpecontextError(f"{inner} and {outer} cannot make both {points[0].label} and {points[1].label}: "
                              f"the closest ({outer} {best:.3g}) misses {points[1].label} by {miss:+.2f} ms; "
                              "the model lacks what differs between them")
    t = with_figure(target, outer, best)
    return {outer: best, inner: _fit_one(t, inner, points[0])}


def overlap_points(predict: Callable[[Target, float], float], measured: list[tuple[float, float]]) -> list[Point]:
    """Points of one step measured at several overlaps, labelled by the overlap ('0.8')."""
    return [Point(f"{o:g}", ms, lambda t, o=o: predict(t, o)) for o, ms in sorted(measured)]


def fit(target: Target, points: list[Point], figures: list[str], fit_on: list[str]) -> FitResult:
    """Fit figures (one per label in fit_on) to those points' measured steps; predict every point."""
    by_label = {p.label: p for p in points}
    if any(label not in by_label for label in fit_on) or len(fit_on) != len(figures) or len(figures) not in (1, 2):
        raise SpecontextError(f"fit {len(figures)} figure(s) {figures} on as many measured points; got "
                              f"--fit-on {fit_on} (measured: {list(by_label)}); one or two figures")
    chosen = [by_label[label] for label in fit_on]
    if len(figures) == 1:
        values = {figures[0]: _fit_one(target, figures[0], chosen[0])}
    else:
        values = _fit_two(target, figures, chosen)
    fitted = target
    for figure, value in values.items():
        fitted = with_figure(fitted, figure, value)
    rows = [{"point": p.label, "measured_ms": p.measured_ms, "before_ms": p.predict(target),
             "after_ms": p.predict(fitted), "role": "fit" if p.label in fit_on else "held out"} for p in points]
    return FitResult(fitted, values, rows)

"""ilp.py: properties of the residency plans (not their timing) and the infeasibility message."""
from dataclasses import replace

import pytest

from specontext_compiler.cost_models import memory
from specontext_compiler.cost_models.ilp import plan_residency, segment_bounds
from specontext_compiler.cost_models.target import load_target, override_target
from specontext_compiler.cost_models.workload import Workload
from specontext_compiler.errors import InfeasiblePlanError, SpecontextError

LONG = Workload(max_len=131072, prompt_len=2048, batch=1, budget=2048)


def _final_offloaded(solution) -> int:
    return len(solution.segments[-1].offloaded_layers)


def test_segments_are_geometric_and_cover_the_range():
    bounds = segment_bounds(2048, 131072)
    assert bounds[0][0] == 2048 and bounds[-1][1] == 131072 and 6 <= len(bounds) <= 10
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    ratios = [to / frm for frm, to in bounds]
    assert max(ratios) / min(ratios) < 1.01
    assert segment_bounds(100, 103) == [(100, 101), (101, 102), (102, 103)]


def test_ample_memory_offloads_nothing(llama):
    solution = plan_residency(llama, replace(LONG, max_len=16384), load_target("h200"), batch=2)
    assert all(not seg.offloaded_layers for seg in solution.segments)
    assert solution.schedule == []


def test_more_gpu_memory_never_offloads_more(llama):
    h100 = load_target("h100")
    counts = []
    for gib in (40, 60, 80, 120):
        target = replace(h100, gpu_memory_bytes=gib * 1024 ** 3)
        solution = plan_residency(llama, LONG, target, batch=4)
        counts.append([len(seg.offloaded_layers) for seg in solution.segments])
    for smaller, larger in zip(counts, counts[1:]):
        assert all(b <= a for a, b in zip(smaller, larger))
    assert counts[0][-1] > counts[-1][-1]


def test_longer_max_len_never_offloads_fewer(llama):
    h100 = load_target("h100")
    finals = [_final_offloaded(plan_residency(llama, replace(LONG, max_len=n), h100, batch=6))
              for n in (32768, 65536, 131072)]
    assert finals == sorted(finals) and finals[-1] > 0


def test_residency_is_monotone_and_memory_fits(llama):
    target = load_target("a100-80gb")
    solution = plan_residency(llama, LONG, target, batch=6)
    for seg, nxt in zip(solution.segments, solution.segments[1:]):
        assert set(seg.offloaded_layers) <= set(nxt.offloaded_layers)
    for seg in solution.segments:
        assert seg.predicted["gpu_bytes"] <= target.gpu_memory_bytes
        assert sorted(seg.gpu_layers + seg.offloaded_layers) == list(range(32))
    pinnable = memory.pinnable_host_bytes(target.host_memory_bytes)
    assert solution.segments[-1].predicted["host_bytes"] <= pinnable
    assert _final_offloaded(solution) > 0
    assert [layer for layer, _ in solution.schedule] == sorted(solution.segments[-1].offloaded_layers)


def test_prediction_matches_the_solver_objective_without_contention(llama):
    # no contention figures and the copy at one rate: the step DAG is the ILP's FIFO recursion
    quiet = override_target(load_target("a100-40gb"), {"overlapped_copy_efficiency": 1.0})
    solution = plan_residency(llama, replace(LONG, selection_overlap=0.5), quiet, batch=5)
    assert solution.solver["status"] == "optimal"
    assert solution.predicted["decode_s"] == pytest.approx(solution.solver["objective"], rel=1e-6)
    assert any(seg.predicted["stall_ms"] > 0 for seg in solution.segments)


def test_the_ilp_prices_copies_beside_compute_the_dag_lets_them_run_alone(llama):
    # a100-40gb's copies run at 0.76 of their rate beside compute; the ILP charges that rate
    # always, the DAG only while compute runs, so the DAG's decode time is the lower one
    solution = plan_residency(llama, replace(LONG, selection_overlap=0.5), load_target("a100-40gb"), batch=5)
    assert solution.predicted["decode_s"] < solution.solver["objective"]
    assert solution.predicted["decode_s"] > 0.8 * solution.solver["objective"]
    assert all(seg.predicted["selection_overlap"] == 0.5 for seg in solution.segments)


def test_symmetry_breaking_keeps_the_optimum(tiny):
    work = Workload(max_len=32768, prompt_len=512, batch=3, budget=256, selection_overlap=0.3)
    base = load_target("rtx4090")
    kv_at_max = memory.resident_kv_bytes(tiny, work, tiny.num_layers, work.max_len)
    small = replace(base, gpu_memory_bytes=int(memory.gpu_bytes(tiny, work, 0, work.max_len) + 0.6 * kv_at_max))
    with_rule = plan_residency(tiny, work, small, batch=3)
    without = plan_residency(tiny, work, small, batch=3, symmetry_breaking=False)
    assert _final_offloaded(with_rule) > 0
    assert with_rule.solver["objective"] == pytest.approx(without.solver["objective"], rel=1e-6)


def test_unified_memory_never_offloads(llama):
    solution = plan_residency(llama, replace(LONG, max_len=65536), load_target("jetson"), batch=2)
    assert all(not seg.offloaded_layers for seg in solution.segments)


def test_auto_batch_keeps_the_best_it_tried(llama):
    solution = plan_residency(llama, LONG, load_target("a100-40gb"), batch="auto")
    tried = {d["batch"]: d["tokens_per_s"] for d in solution.batch_search}
    assert 1 in tried and solution.batch in tried and len(tried) >= 3
    assert solution.predicted["tokens_per_s"] == max(tried.values())


def test_infeasible_names_the_shortfall_and_the_fix(llama):
    with pytest.raises(InfeasiblePlanError) as err:
        plan_residency(llama, LONG, load_target("a100-40gb"), batch=64)
    message = str(err.value)
    assert "batch 64, 128k" in message and "a100-40gb" in message and "GB" in message
    assert "--batch" in message and "\n" not in message


def test_infeasible_model_suggests_another_target(llama):
    heavy = replace(llama, param_count=20_000_000_000)
    with pytest.raises(InfeasiblePlanError, match="weights 40.1 .* rtx4090 has 25.8 GB; use --target"):
        plan_residency(heavy, LONG, load_target("rtx4090"), batch=1)


def test_bad_batch_is_a_user_error(llama):
    with pytest.raises(SpecontextError, match="positive integer or 'auto'"):
        plan_residency(llama, LONG, load_target("h100"), batch=0)

"""step_dag.py and the step it prices: DAG structure, contention, critical path, the overlap, the fit."""
from dataclasses import replace

import pytest

from specontext_compiler.cost_models import latency, step_dag
from specontext_compiler.cost_models.contention_fit import fit, overlap_points
from specontext_compiler.cost_models.step_dag import Contention, Op
from specontext_compiler.cost_models.target import load_target, override_target
from specontext_compiler.cost_models.workload import Workload

WORK = Workload(max_len=131072, prompt_len=130560, batch=11, budget=2048)
OFFLOADED = range(20, 32)


@pytest.fixture
def h200_contended():
    """The H200 with the probe figures quoted in issue 15: gather 33 GB/s alone, 21.5 beside GEMMs
    (no fixed time per gather: its bytes alone)."""
    return override_target(load_target("h200"), {"pinned_gather_gbps": 33, "gather_gbps_beside_compute": 21.5,
                                                  "compute_slowdown_beside_gather": 1.5, "gather_fixed_us": 0.0})


def test_dag_has_one_node_per_operation_and_the_runtime_edges(llama, h200_contended):
    ops, events = latency.step_ops(llama, WORK, h200_contended, 130560, OFFLOADED)
    graph = step_dag.build_dag(ops, events)
    assert graph.number_of_nodes() == 2 + 1 + 12 + 32 + 1       # retrieval, top-k, diff, gathers, layers, lm head
    stream_edges = {(a, b) for a, b, kind in graph.edges(data="kind") if kind == "stream"}
    assert ("layer 4", "layer 5") in stream_edges and ("gather L20", "gather L21") in stream_edges
    assert ("diff", "gather L20") in stream_edges and ("top-k", "layer 0") in stream_edges
    event_edges = {(a, b) for a, b, kind in graph.edges(data="kind") if kind == "event"}
    assert ("top-k", "diff") in event_edges
    assert {(f"gather L{j}", f"layer {j}") for j in OFFLOADED} <= event_edges
    assert not any(b == "layer 5" for a, b in event_edges)      # resident layers wait for no copy


def test_two_overlapping_ops_share_the_machine_as_the_fluid_model_says():
    ops = [Op("c", "compute", 4.0), Op("g", "copy", 2.0, role="gather")]
    sched = step_dag.schedule(ops, [], Contention(compute_slowdown=2.0, gather_slowdown=1.5))
    # the gather runs at 1/1.5 for 3 ms; the compute does 1.5 ms of work meanwhile, then 2.5 alone
    assert sched.span("g").end_ms == pytest.approx(3.0)
    assert sched.span("c").end_ms == pytest.approx(5.5)
    assert sched.step_ms == pytest.approx(5.5) and sched.critical_path == ["c"]
    quiet = step_dag.schedule(ops, [])
    assert quiet.step_ms == pytest.approx(4.0)


def test_a_chain_is_the_sum_whatever_the_contention():
    ops = [Op("a", "compute", 1.0), Op("g", "copy", 2.0, role="gather"), Op("b", "compute", 3.0)]
    sched = step_dag.schedule(ops, [("a", "g"), ("g", "b")], Contention(3.0, 3.0))
    assert sched.step_ms == pytest.approx(6.0) and sched.critical_path == ["a", "g", "b"]


def test_with_no_overlap_possible_the_step_is_the_sum_of_its_operations(llama, h200_contended):
    # every layer offloaded, each gather issued only when its own layer is reached: the copy and
    # the compute never run together, so contention changes nothing and the step is the sum
    layers = range(llama.num_layers)
    issue = {j: j for j in layers}
    ops, _ = latency.step_ops(llama, WORK, h200_contended, 130560, layers, issue)
    step = latency.step_time(llama, WORK, h200_contended, 130560, layers, issue)
    assert step.step_ms == pytest.approx(sum(op.work_ms for op in ops), rel=1e-9)
    assert step.critical_path.startswith("retrieval > top-k > diff > gather L0 > layer 0 > gather L1")


def test_critical_path_length_is_the_step(llama, h200_contended):
    sched = latency.step_schedule(llama, WORK, h200_contended, 130560, OFFLOADED)
    on_path = [sched.span(name) for name in sched.critical_path]
    assert sum(op.end_ms - op.start_ms for op in on_path) == pytest.approx(sched.step_ms)
    for before, after in zip(on_path, on_path[1:]):
        assert after.start_ms == pytest.approx(before.end_ms)


def test_the_step_moves_with_the_selection_overlap(llama, h200_contended):
    steps = {o: latency.step_time(llama, replace(WORK, selection_overlap=o), h200_contended, 130560, OFFLOADED)
             for o in (0.5, 0.8, 0.9, 0.95)}
    assert steps[0.5].step_ms > steps[0.8].step_ms > steps[0.9].step_ms > steps[0.95].step_ms
    assert "gather L20..L31" in steps[0.5].critical_path      # copy-bound when most rows move
    assert all(s.selection_overlap == o for o, s in steps.items())
    # contention: beside the gathers the layers take longer than with a quiet copy engine
    quiet = override_target(h200_contended, {"compute_slowdown_beside_gather": 1.0})
    calm = latency.step_time(llama, replace(WORK, selection_overlap=0.95), quiet, 130560, OFFLOADED)
    assert steps[0.95].compute_ms > calm.compute_ms


def _predictor(llama):
    def predict(target, overlap):
        return latency.step_time(llama, replace(WORK, selection_overlap=overlap), target, 130560, OFFLOADED).step_ms
    return predict


def test_fit_on_one_point_reproduces_it_and_predicts_the_others(llama, h200_contended):
    predict = _predictor(llama)
    measured = [(0.8, 19.07), (0.9, 14.16), (0.95, 11.47)]      # issue 15, 128k, batch 11, older kernels
    result = fit(h200_contended, overlap_points(predict, measured), ["gather_rate"], ["0.8"])
    rows = {r["point"]: r for r in result.rows}
    assert rows["0.8"]["after_ms"] == pytest.approx(19.07, rel=1e-4) and rows["0.8"]["role"] == "fit"
    assert rows["0.9"]["role"] == rows["0.95"]["role"] == "held out"
    assert rows["0.9"]["after_ms"] > rows["0.95"]["after_ms"]
    assert 0 < result.values["gather_rate"] < 1     # the runtime's gather was slower than the probe's
    ratio = result.target.pinned_gather_gbps / result.target.gather_gbps_overlapped
    assert ratio == pytest.approx(33 / 21.5)        # the measured alone/beside ratio is kept


def test_fit_refuses_a_point_it_cannot_reach(llama, h200_contended):
    from specontext_compiler.errors import SpecontextError
    with pytest.raises(SpecontextError, match="cannot make the step"):
        fit(h200_contended, overlap_points(_predictor(llama), [(0.8, 1.0)]), ["gather_rate"], ["0.8"])  # < compute
    with pytest.raises(SpecontextError, match="cannot make both 0.8 and 0.95"):   # more overlap, slower: no fit
        fit(h200_contended, overlap_points(_predictor(llama), [(0.8, 19.0), (0.95, 25.0)]),
            ["gather_rate", "compute_slowdown"], ["0.8", "0.95"])
    with pytest.raises(SpecontextError, match="as many measured points"):
        fit(h200_contended, overlap_points(_predictor(llama), [(0.8, 19.0)]), ["gather_rate"], ["0.9"])


def test_gathers_on_two_copy_streams_share_the_link(llama, h200_contended):
    one = latency.step_schedule(llama, replace(WORK, selection_overlap=0.5), h200_contended, 130560, OFFLOADED)
    two = latency.step_schedule(llama, replace(WORK, selection_overlap=0.5), h200_contended, 130560, OFFLOADED,
                                copy_streams=2)
    assert {op.stream for op in two.ops} == {"compute", "copy", "copy 2"}
    # L20 and L21 start together and move at half the rate each: both end when one stream would
    # have finished both, so the link's total rate, not the stream count, sets the copy chain
    l20, l21 = two.span("gather L20"), two.span("gather L21")
    assert l20.start_ms == pytest.approx(l21.start_ms)
    assert l21.end_ms == pytest.approx(one.span("gather L21").end_ms, rel=1e-6)
    assert two.step_ms == pytest.approx(one.step_ms, rel=0.05)


def test_a_fixed_time_per_gather_lengthens_the_copy_chain_whatever_the_bytes(llama, h200_contended):
    work = replace(WORK, selection_overlap=0.95)
    base = latency.step_time(llama, work, h200_contended, 130560, OFFLOADED)
    fixed = override_target(h200_contended, {"gather_fixed_us": 500.0})
    slower = latency.step_time(llama, work, fixed, 130560, OFFLOADED)
    assert slower.transfer_ms - base.transfer_ms >= len(OFFLOADED) * 0.5 * 0.999   # at least 0.5 ms a gather
    assert slower.step_ms > base.step_ms

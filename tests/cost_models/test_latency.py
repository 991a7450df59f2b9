"""latency.py: the roofline pieces by hand, the overlap model and the timeline."""
import pytest

from specontext_compiler.cost_models import latency
from specontext_compiler.cost_models.target import load_target
from specontext_compiler.cost_models.workload import Workload


@pytest.fixture
def h100():
    return load_target("h100")


def test_layer_params_reproduce_llama_param_count(llama):
    # 32 layers + untied embedding and LM head + final norm = the published 8,030,261,248
    assert latency.layer_params(llama) * 32 + 2 * 128256 * 4096 + 4096 == llama.param_count


def test_h2d_bytes_are_the_elastic_delta(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=4, selection_overlap=0.75)
    step = latency.step_time(llama, w, h100, 100000, offloaded_layers=range(24, 32))
    per_layer = 4 * 0.25 * 2065 * 4096     # R x (1 - overlap) x W x 4HD
    assert step.h2d_bytes_per_step == pytest.approx(8 * per_layer)


def test_no_offload_means_no_transfer_and_no_stall(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=8)
    step = latency.step_time(llama, w, h100, 60000)
    assert step.transfer_ms == 0 and step.stall_ms == 0 and step.h2d_bytes_per_step == 0
    assert step.step_ms == pytest.approx(step.retrieval_ms + step.compute_ms)
    assert step.tokens_per_s == pytest.approx(8 * 1e3 / step.step_ms)
    # weights dominate HBM traffic: one full read of the layers + LM head per step
    assert step.hbm_bytes_per_step > 0.95 * llama.param_count * 2


def test_offloading_the_last_layers_stalls_least(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=16, selection_overlap=0.5)
    last = latency.step_time(llama, w, h100, 131072, range(22, 32))
    first = latency.step_time(llama, w, h100, 131072, range(0, 10))
    none = latency.step_time(llama, w, h100, 131072)
    assert first.stall_ms > last.stall_ms >= 0
    assert last.step_ms >= none.step_ms
    assert first.h2d_bytes_per_step == pytest.approx(last.h2d_bytes_per_step)
    # the same copies, each between its time alone and its time beside compute
    c = latency.step_components(llama, w, h100, 131072)
    for step in (first, last):
        assert 10 * c.gather_alone_ms - 1e-9 <= step.transfer_ms - c.diff_ms <= 10 * c.transfer_ms + 1e-9


def test_later_prefetch_issue_never_helps(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=16, selection_overlap=0.5)
    layers = list(range(16, 32))
    early = latency.step_time(llama, w, h100, 131072, layers)
    late = latency.step_time(llama, w, h100, 131072, layers, issue_before={j: j for j in layers})
    assert late.stall_ms >= early.stall_ms


def test_timeline_respects_streams_and_dependencies(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=12, selection_overlap=0.6)
    offloaded = range(20, 32)
    events = latency.timeline(llama, w, h100, 120000, offloaded)
    compute = [e for e in events if e.stream == "compute"]
    copies = {e.label: e for e in events if e.stream == "copy" and e.label != "diff"}
    assert len(copies) == 12
    for a, b in zip(compute, compute[1:]):
        assert b.start_ms >= a.end_ms - 1e-12
    topk_end = next(e for e in compute if e.label == "top-k").end_ms
    for j in offloaded:
        copy = copies[f"gather L{j}"]
        layer = next(e for e in compute if e.label == f"layer {j}")
        assert copy.start_ms >= topk_end and layer.start_ms >= copy.end_ms - 1e-12
    step = latency.step_time(llama, w, h100, 120000, offloaded)
    assert max(e.end_ms for e in compute) == pytest.approx(step.step_ms)


def test_retrieval_grows_with_length(llama, h100):
    w = Workload(max_len=131072, prompt_len=2048, batch=8)
    short = latency.step_time(llama, w, h100, 4096).retrieval_ms
    long = latency.step_time(llama, w, h100, 131072).retrieval_ms
    assert long > 5 * short

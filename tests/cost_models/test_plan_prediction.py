"""plan_prediction: a compiled plan's latency model re-evaluated at a measured selection overlap."""
import pytest

from specontext_compiler.cost_models.plan_prediction import predicted_step
from specontext_compiler.driver import compile_model
from specontext_compiler.runtime.plan import load_plan


def test_reproduces_the_plan_and_charges_a_lower_overlap(tmp_path):
    compile_model("llama-3.1-8b", target="h100", max_len=131072, prompt_len=130560, budget=2048, batch=8,
                  out=tmp_path / "plan")
    plan = load_plan(tmp_path / "plan")
    segment = plan.segment_for(130560)
    assert segment.offloaded_layers, "the test needs offloaded layers for overlap to matter"
    at_plan = predicted_step(plan, 130560)
    assert abs(at_plan.step_ms - segment.predicted["step_ms"]) < 0.01 * segment.predicted["step_ms"]
    random_weights = predicted_step(plan, 130560, selection_overlap=0.13)
    # 0.87 of the budget instead of 0.2 crosses PCIe per offloaded layer each step
    assert random_weights.h2d_bytes_per_step > 4 * at_plan.h2d_bytes_per_step
    assert random_weights.step_ms > at_plan.step_ms


def test_repriced_plan_moves_with_the_overlap(tmp_path):
    from specontext_compiler.cost_models.plan_prediction import repriced
    compile_model("llama-3.1-8b", target="h200", max_len=131072, prompt_len=130560, budget=2048, batch=11,
                  out=tmp_path / "plan")
    plan = load_plan(tmp_path / "plan")
    low, high = repriced(plan, 0.3), repriced(plan, 0.95)
    assert low.workload.selection_overlap == 0.3 and plan.workload.selection_overlap == 0.8
    last_low, last_high = low.segments[-1].predicted, high.segments[-1].predicted
    assert last_low["selection_overlap"] == 0.3 and last_low["step_ms"] > last_high["step_ms"]
    assert last_low["h2d_bytes_per_step"] > 10 * last_high["h2d_bytes_per_step"]
    assert "gather" in last_low["critical_path"]           # most rows move: the copies set the step
    copy_end = max(e["end_ms"] for e in low.prediction["timeline"] if e["stream"] == "copy")
    assert copy_end > max(e["end_ms"] for e in high.prediction["timeline"] if e["stream"] == "copy")
    assert low.prediction["tokens_per_s"] < plan.prediction["tokens_per_s"] < high.prediction["tokens_per_s"]
    # the unchanged overlap reproduces the compiled plan
    same = repriced(plan, 0.8)
    assert same.segments[-1].predicted["step_ms"] == pytest.approx(plan.segments[-1].predicted["step_ms"])

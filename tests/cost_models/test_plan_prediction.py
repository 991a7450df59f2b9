"""plan_prediction: a compiled plan's latency model re-evaluated at a measured selection overlap."""
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

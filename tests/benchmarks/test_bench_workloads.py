"""bench_workloads' run on CPU with a tiny plan: every request served, the rates consistent."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from specontext_compiler import compile_model
from specontext_compiler.models import load_preset_config


def test_run_workload_reports_steady_decode_and_step_times(tmp_path):
    pytest.importorskip("pulp", reason="compiling a plan needs PuLP")
    import bench_workloads
    plan = tmp_path / "wl"
    compile_model("tiny-llama", target="h100", max_len=256, budget=256, recent_tokens=0, batch=3,
                  prompt_len=40, out=plan)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama")).eval()
    row = bench_workloads.run_workload(model, plan, prompt_len=40, new_tokens=12, max_seconds=600)
    assert row["finished"] and row["requests"] == 3
    assert row["generated"] == 3 * 12 and row["steps"] == 12
    assert row["steady_decode_tokens_per_s"] > 0      # tokens after every request had its first one
    assert row["request0_step_ms_p50"] <= row["request0_step_ms_p90"] <= row["request0_step_ms_max"]
    assert row["end_to_end_tokens_per_s"] <= row["decode_tokens_per_s"]

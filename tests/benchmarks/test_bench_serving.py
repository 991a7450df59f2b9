"""bench_serving's CPU path on a tiny plan: every request served, the numbers consistent."""
import json

import pytest

from specontext_compiler import compile_model


def test_bench_serving_runs_on_a_tiny_plan(tmp_path, capsys):
    pytest.importorskip("pulp", reason="compiling a plan needs PuLP")
    import bench_serving
    plan = tmp_path / "plan"
    compile_model("tiny-llama", target="h100", max_len=256, budget=256, recent_tokens=0, out=plan)
    report = bench_serving.main([str(plan), "--preset", "tiny-llama", "--batch", "3", "--requests", "7",
                                 "--rate", "50", "--input-len", "40", "--output-len", "12",
                                 "--prefill-chunk", "16", "--wave-baseline", "--out", str(tmp_path)])
    assert report["failed"] == 0 and report["requests"] == 7
    saved = json.loads((tmp_path / "bench_serving.json").read_text())
    assert sum(r["output_tokens"] for r in saved["requests"]) == round(report["output_tokens_per_s"] * report["duration_s"])
    assert all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in saved["requests"])
    assert report["wave_duration_s"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("| wave_duration_s |")

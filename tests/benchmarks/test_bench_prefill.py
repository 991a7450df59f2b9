"""bench_prefill's CPU path on tiny plans: HF's and the engine's prefill side by side, one table."""
import json

import pytest

from specontext_compiler import compile_model


def test_bench_prefill_runs_on_tiny_plans(tmp_path, capsys):
    pytest.importorskip("pulp", reason="compiling a plan needs PuLP")
    import bench_prefill
    compile_model("tiny-llama", target="h100", max_len=256, budget=256, recent_tokens=0, out=tmp_path / "dense")
    rows = bench_prefill.main(["--plans", str(tmp_path), "--names", "dense", "--preset", "tiny-llama",
                               "--lengths", "100,255,300", "--repeats", "1", "--chunk", "64", "--out", str(tmp_path)])
    by = {(r["method"], r["prompt"]): r for r in rows}
    assert all(by[("HF sdpa", n)]["tokens_per_s"] > 0 for n in (100, 255, 300))
    ours = by[("specontext dense", 100)]
    assert ours["tokens_per_s"] > 0 and ours["chunk"] == 64 and ours["forwards_per_prompt"] == 2   # 64 + 36
    assert "max-len 256" in by[("specontext dense", 300)]["error"]             # 300 + 1 > 256: a row, no crash
    saved = json.loads((tmp_path / "bench_prefill.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["device"] == "cpu"
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("| 300 | specontext dense | failed")
    assert any(line.startswith("| 100 | specontext dense | 50 |") for line in table)


def test_a_missing_plan_is_one_line_and_exit_2(tmp_path, capsys):
    import bench_prefill
    with pytest.raises(SystemExit) as exit_info:
        bench_prefill.main(["--plans", str(tmp_path), "--names", "nowhere", "--preset", "tiny-llama",
                            "--lengths", "16", "--repeats", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]

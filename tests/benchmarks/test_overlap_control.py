"""Synthetic selection overlap (benchmarks/overlap_control.py): the calibration, then the real engine.

The calibration is checked on a draw it did not see (the benchmark calibrates on one draw and
fills every slot with fresh ones); the engine check runs the plan's decode graph on the CPU with
an offloaded layer, so the overlap is the prefetcher's own count of rows copied and selected.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import overlap_control
from bench_e2e import fill_store_randomly
from specontext_compiler import compile_model, load_plan
from specontext_compiler.models import load_preset_config
from specontext_compiler.runtime.plan import Segment

ROOT = Path(__file__).resolve().parents[2]
CONTEXT, BUDGET, STEPS = 1024, 64, 8      # tiny plan: width 81 (1 sink + 16 recent + 64) of 1024 rows


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_calibrated_beta_gives_the_target_on_a_fresh_draw(target):
    """Llama-3.1-8B's head shape and RoPE (32 query heads, 8 KV heads, D 128) at 4k keys, budget 256."""
    config = json.loads((ROOT / "specontext_compiler/presets/llama-3.1-8b.json").read_text())
    seen = overlap_control.unweighted_inputs(config, 4096, 256, seed=0)
    result = overlap_control.calibrate(target, seen.queries, seen.draws, seen.tail_keys, 4096, seen.config,
                                       seen.scaling, tolerance=0.01)
    fresh = overlap_control.unweighted_inputs(config, 4096, 256, seed=1)
    overlap = overlap_control.overlap_at(result.beta, fresh.queries, fresh.draws, fresh.tail_keys, 4096,
                                         fresh.config, fresh.scaling)
    assert abs(overlap - target) < 0.05, (result, overlap)


def test_a_target_the_construction_cannot_reach_is_refused():
    config = json.loads((ROOT / "specontext_compiler/presets/tiny-llama.json").read_text())
    shape = overlap_control.unweighted_inputs(config, 512, 64, seed=0)
    with pytest.raises(ValueError, match="outside what this construction reaches"):
        overlap_control.calibrate(0.01, shape.queries, shape.draws, shape.tail_keys, 512, shape.config,
                                  shape.scaling)


@pytest.fixture(scope="module")
def offloading_engine(tmp_path_factory):
    """tiny-llama bound on the CPU, 2 slots, its last layer offloaded from the start."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("plans") / "sparse"
    compile_model("tiny-llama", target="h100", max_len=CONTEXT + 64, prompt_len=CONTEXT, budget=BUDGET,
                  recent_tokens=16, batch=2, out=out)
    plan = load_plan(out)
    last = plan.model.num_layers - 1
    plan.segments = [Segment(0, plan.workload.max_len, list(range(last)), [last], {})]
    return plan.bind(model, device="cpu")


def _engine_overlap(engine, next_ids) -> float:
    """The engine's overlap over STEPS decode steps after the first (which fills the buffer)."""
    ids = next_ids(None)
    for step in range(STEPS + 1):
        if step == 1:
            before = engine.stats()
        logits = engine.step.run(ids, engine.ctx.cache_len.view(-1, 1).clone())
        ids = next_ids(logits)
    return overlap_control.overlap_between(before, engine.stats())


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_engine_selects_with_the_target_overlap(offloading_engine, target):
    engine = offloading_engine
    fill_store_randomly(engine, CONTEXT)
    calibration = overlap_control.prepare_engine(engine, CONTEXT, target)
    ids = overlap_control.fixed_token_ids(engine.slots, "cpu")
    measured = _engine_overlap(engine, lambda logits: ids)
    assert engine.stats()["offloaded_layers"] == [engine.plan.model.num_layers - 1]
    assert abs(measured - target) < 0.1, (calibration, measured)


def test_bench_time_engine_reports_target_knob_and_measured_overlap(offloading_engine, monkeypatch):
    """bench_e2e.time_engine's synthetic path on the CPU (its CUDA timing calls made no-ops)."""
    import bench_e2e
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: 0)
    row = bench_e2e.time_engine(offloading_engine, CONTEXT, steps=5, overlap=0.7)
    assert row["overlap_target"] == 0.7 and row["overlap_beta"] > 0
    assert abs(row["overlap_simulated"] - 0.7) <= 0.005
    assert abs(row["overlap_timed"] - 0.7) < 0.1
    assert row["overlap"] < row["overlap_timed"]       # all steps: the first full load is in it


def test_without_it_random_state_selects_far_below(offloading_engine):
    """The control: the benchmark's default (random head keys, argmax tokens) on the same engine."""
    engine = offloading_engine
    fill_store_randomly(engine, CONTEXT)
    first = torch.randint(0, 256, (engine.slots, 1))
    measured = _engine_overlap(engine, lambda logits: first if logits is None else logits[:, -1].argmax(-1, True))
    assert measured < 0.5


@pytest.mark.parametrize("value", ["0", "1", "nan", "eighty", "-0.1"])
def test_parse_target_takes_only_a_share_strictly_between_0_and_1(value):
    with pytest.raises(ValueError, match="between 0 and 1"):
        overlap_control.parse_target(value)
    assert overlap_control.parse_target("0.8") == 0.8


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_bench_refuses_a_bad_overlap_in_one_line(value):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_e2e.py"), f"--overlap={value}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overlap" in lines[0] and "between 0 and 1" in lines[0], proc.stderr

"""The inspect report, report.md and the PNG plot, on plans the compiler wrote.

make_plan compiles a small Llama-shaped model (named llama-3.1-8b, 64 wide) for a target with
little GPU memory and a slow host link, so layers go to the host as the sequence grows and the
compute stream stalls on their copies: every view has something to show.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from specontext_compiler import report
from specontext_compiler.driver import compile_model as _compile_model   # bound now: test_cli fakes the driver's
from specontext_compiler.report_timeline import critical_path_line, find_stalls, gantt
from specontext_compiler.runtime.plan import Plan, Segment, load_plan

GIB = 1024 ** 3
TARGET = Path(__file__).resolve().parents[1] / "specontext_compiler" / "targets" / "a100-80gb.toml"


def _plans_root() -> Path:
    """One folder per test process for the compiled plans (test_cli.py loads this module again)."""
    if "SPECONTEXT_TEST_PLANS" not in os.environ:
        root = tempfile.mkdtemp(prefix="specontext-test-plans-")
        os.environ["SPECONTEXT_TEST_PLANS"] = root
        atexit.register(shutil.rmtree, root, True)
    return Path(os.environ["SPECONTEXT_TEST_PLANS"])


def _small_target(root: Path, num_layers: int, max_len: int) -> Path:
    """a100-80gb's figures with memory for the step's workspace (~4.9 GB, mostly the fixed reserve)
    and 40% of the KV at max_len, and a slow gather from the host."""
    text = TARGET.read_text().replace('name = "a100-80gb"', 'name = "a100-small"')
    kv_bytes = num_layers * max_len * 2 * 2 * 16 * 2          # layers x tokens x (K, V) x KV heads x dim x bf16
    memory = int(4.9e9 + 0.4 * kv_bytes)
    text = re.sub(r"(?m)^gpu_memory_bytes = [0-9_]+", f"gpu_memory_bytes = {memory}", text)
    text = re.sub(r"(?m)^pinned_gather_gbps = [0-9.]+", "pinned_gather_gbps = 0.02", text)
    path = root / f"a100-small-{num_layers}-{max_len}.toml"
    path.write_text(text)
    return path


def make_plan(num_layers: int = 32, max_len: int = 131072) -> Plan:
    """A compiled plan (a fresh copy each call), compiled once per shape in a test process."""
    from transformers import LlamaConfig
    root = _plans_root()
    out = root / f"plan-{num_layers}-{max_len}"
    if not (out / "plan.json").is_file():
        model = root / f"model-{num_layers}-{max_len}" / "llama-3.1-8b"
        LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=num_layers, vocab_size=256,
                    max_position_embeddings=max_len).save_pretrained(model)
        _compile_model(str(model), target_file=str(_small_target(root, num_layers, max_len)), max_len=max_len,
                      selection_overlap=0.7, out=out)
    return load_plan(out)


def plan_files(plan: Plan) -> dict[str, bytes]:
    """The files the compiler wrote beside plan.json, to write the plan elsewhere."""
    return {str(f.relative_to(plan.directory)): f.read_bytes() for f in plan.directory.rglob("*")
            if f.is_file() and f.name not in ("plan.json", "manifest.json")}


def _render(plan: Plan, width: int = 100) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for part in report.render_report(plan):
        console.print(part)
    return console.export_text()


def test_report_shows_every_view():
    plan = make_plan()
    assert plan.segments[0].offloaded_layers == [] and plan.segments[-1].offloaded_layers   # the fixture offloads
    text = _render(plan)
    for title in ("KV residency per layer", "Predictions per segment", "GPU memory per segment",
                  "Predicted overlap", "Compiler passes"):
        assert title in text
    last = plan.segments[-1]
    assert report.residency_strip(last, 32) in text
    assert f"{len(last.gpu_layers)}/32" in text
    assert f"{last.predicted['tokens_per_s']:.1f}" in text


@pytest.mark.parametrize("num_layers", [32, 61])
def test_report_fits_100_columns(num_layers):
    plan = make_plan(num_layers=num_layers)
    text = _render(plan, width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    # the residency strip is never wrapped: each segment's full strip sits on its own line
    for seg in plan.segments:
        assert f"{report._range(seg)} " in text and report.residency_strip(seg, num_layers) in text


def test_residency_strip_marks_offloaded_layers():
    seg = Segment(0, 1024, gpu_layers=[0, 2], offloaded_layers=[1, 3], predicted={})
    assert report.residency_strip(seg, 4) == "GCGC"


def test_stalls_are_gaps_on_the_compute_stream():
    events = [{"stream": "compute", "label": "L0", "start_ms": 0.0, "end_ms": 1.0},
              {"stream": "copy", "label": "kv L1", "start_ms": 0.0, "end_ms": 1.7},
              {"stream": "compute", "label": "L1", "start_ms": 1.7, "end_ms": 2.5}]
    stalls = find_stalls(events)
    assert [s[0] for s in stalls] == ["before L1"] and stalls[0][2] == pytest.approx(0.7)


def test_stalls_are_drawn_on_their_own_row():
    plan = make_plan()
    events = report._timeline_events(plan)
    stalls = find_stalls(events)
    assert stalls, "the fixture's slow host link should stall the compute stream"
    rows = dict(gantt(events, 64))
    assert list(rows)[:3] == ["compute", "copy", "stall"] and len(rows["stall"]) == len(stalls)
    assert f"in {len(stalls)} stalls" in _render(plan)


def test_memory_rows_per_segment():
    plan = make_plan()
    headers, rows = report._memory_rows(plan)
    assert len(rows) == len(plan.segments) and headers[:3] == ["up to", "weights", "retrieval head"]
    assert headers[-3:] == ["GPU total", "of GPU", "host pinned"]
    for row, entry in zip(rows, plan.prediction["memory_breakdown"]):
        assert row[headers.index("resident kv")] == f"{entry['resident_kv'] / GIB:.2f}"
        assert row[-1] == f"{entry['host_pinned'] / GIB:.2f}"


def test_markdown_has_tables_and_no_ansi():
    plan = make_plan()
    md = report.render_report_markdown(plan)
    assert "\x1b[" not in md
    assert md.startswith("# Plan: llama-3.1-8b on a100")
    assert "| seq len | GPU layers | step ms |" in md
    assert report.residency_strip(plan.segments[-1], 32) in md


def test_summary_json_round_trips():
    plan = make_plan()
    data = json.loads(json.dumps(report.plan_summary_json(plan)))
    assert data["summary"]["gpu_layers_at_max_len"] == len(plan.segments[-1].gpu_layers)
    assert data["summary"]["tokens_per_s_at_max_len"] == pytest.approx(plan.segments[-1].predicted["tokens_per_s"])
    assert len(data["segments"]) == len(plan.segments)


def test_format_tokens():
    assert [report.format_tokens(n) for n in (131072, 1048576, 1000, 3072)] == ["128k", "1M", "1000", "3k"]


def test_write_plot_makes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from specontext_compiler.plot import write_plot
    path = write_plot(make_plan(), tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_report_prints_the_overlap_beside_every_tok_s_and_the_critical_path():
    plan = make_plan()
    text = _render(plan)
    assert "overlap" in text and "selection overlap 0.7" in text
    headers, rows = report._prediction_rows(plan)
    at = headers.index("overlap")
    assert headers[at - 1] == "tok/s" and all(row[at] == "0.70" for row in rows)
    events = report._timeline_events(plan)
    path = critical_path_line(events)
    assert path.startswith("critical path (█ compute, ▓ copy): ") and path in text
    assert "critical" in dict(gantt(events, 64))
    assert path in report.render_report_markdown(plan)

"""The inspect report, report.md and the PNG plot, on plans built here from Plan dataclasses."""
from __future__ import annotations

import json
import random

import pytest
from rich.console import Console

from specontext_compiler import report
from specontext_compiler.runtime.plan import SCHEMA_VERSION, Plan, PrefetchSlot, Segment

GIB = 1024 ** 3


def make_plan(num_layers: int = 32, max_len: int = 131072, num_segments: int = 5,
              seed: int = 0) -> Plan:
    """A plausible plan: layers offload one by one as the sequence grows; numbers are arithmetic
    on random per-layer costs (a fixture for the renderers, not a prediction of anything)."""
    rng = random.Random(seed)
    kv_bytes_per_token_layer, budget, weights_bytes = 4096, 2048, 16.06e9
    bounds = [0] + [max_len * (i + 1) // num_segments for i in range(num_segments)]
    segments, offloaded, breakdown = [], [], []
    for i in range(num_segments):
        offloaded = sorted(offloaded + rng.sample([l for l in range(num_layers) if l not in offloaded], i and 3))
        gpu = [l for l in range(num_layers) if l not in offloaded]
        to_len = bounds[i + 1]
        parts = {"weights": weights_bytes, "retrieval_head": 0.06e9 * 1.3,
                 "head_k_cache": to_len * 1024.0,
                 "resident_kv": len(gpu) * to_len * kv_bytes_per_token_layer,
                 "budget_buffers": len(offloaded) * budget * kv_bytes_per_token_layer,
                 "workspace": 0.3 * weights_bytes}
        host_bytes = len(offloaded) * to_len * kv_bytes_per_token_layer
        breakdown.append({"from_len": bounds[i], "to_len": to_len, **parts,
                          "total": sum(parts.values()), "host_pinned": host_bytes})
        compute_ms = num_layers * rng.uniform(0.4, 0.6)
        transfer_ms = len(offloaded) * rng.uniform(0.2, 0.5)
        stall_ms = max(0.0, transfer_ms - compute_ms) + rng.uniform(0.01, 0.1) * bool(offloaded)
        step_ms = compute_ms + stall_ms + 1.5
        segments.append(Segment(bounds[i], to_len, gpu, list(offloaded), {
            "gpu_bytes": sum(parts.values()), "host_bytes": host_bytes,
            "h2d_bytes_per_step": len(offloaded) * budget * kv_bytes_per_token_layer * 0.3,
            "step_ms": step_ms, "tokens_per_s": 1000 / step_ms, "compute_ms": compute_ms,
            "transfer_ms": transfer_ms, "stall_ms": stall_ms, "retrieval_ms": 1.5}))
    return Plan(
        schema_version=list(SCHEMA_VERSION), producer={"name": "specontext", "version": "0.1.0"},
        model={"name": "llama-3.1-8b", "architecture": "LlamaForCausalLM", "num_layers": num_layers,
               "attention_kind": "gqa"},
        target={"name": "a100", "gpu_memory_bytes": 80 * GIB},
        workload={"max_len": max_len, "prompt_len": 4096, "batch": 1, "budget": budget,
                  "sink_tokens": 1, "recent_tokens": 16, "selection_overlap": 0.7},
        retrieval_head={"source": "preset", "params": 60_000_000, "reduction": "gqa-max"},
        segments=segments,
        schedule=[PrefetchSlot(l, max(0, l - 2)) for l in offloaded],
        prediction={"timeline": _timeline(num_layers, set(offloaded), rng), "timeline_seq_len": max_len,
                    "memory_breakdown": breakdown},
        solver={"name": "pulp-cbc", "status": "Optimal", "time_s": 0.42, "objective": 29.0},
        graph={"file": "decode_graph.py", "ops": {"sparse_attention": num_layers}},
        passes=[{"name": "find_attention", "seconds": 0.01, "counters": {"sites": num_layers}},
                {"name": "insert_prefetch", "seconds": 0.002, "counters": {"prefetches": len(offloaded)}}],
    )


def _timeline(num_layers: int, offloaded: set[int], rng: random.Random) -> list[dict]:
    events, now, copy_free = [], 0.0, 0.0
    ready = {}
    for layer in sorted(offloaded):  # copies issued two layers ahead, in order, on one stream
        start = max(copy_free, max(0, layer - 2) * 0.5)
        copy_free = start + rng.uniform(0.3, 1.2)
        ready[layer] = copy_free
        events.append({"stream": "copy", "label": f"kv L{layer}", "start_ms": start, "end_ms": copy_free})
    for layer in range(num_layers):
        if ready.get(layer, 0.0) > now:  # the compute stream waits for the copy, as latency.py records it
            events.append({"stream": "compute", "label": f"stall L{layer}", "start_ms": now,
                           "end_ms": ready[layer]})
            now = ready[layer]
        end = now + rng.uniform(0.4, 0.6)
        events.append({"stream": "compute", "label": f"L{layer}", "start_ms": now, "end_ms": end})
        now = end
    return events


def _render(plan: Plan, width: int = 100) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for part in report.render_report(plan):
        console.print(part)
    return console.export_text()


def test_report_shows_every_view():
    plan = make_plan()
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
    plan = make_plan(num_layers=num_layers, num_segments=8)
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
    stalls = report._stalls(events)
    assert [s[0] for s in stalls] == ["before L1"] and stalls[0][2] == pytest.approx(0.7)


def test_explicit_stall_events_are_drawn_on_their_own_row():
    plan = make_plan()
    explicit = [e for e in plan.prediction["timeline"] if e["label"].startswith("stall")]
    assert explicit, "the fixture should stall somewhere"
    assert len(report._stalls(report._timeline_events(plan))) == len(explicit)
    rows = dict(report._gantt(report._timeline_events(plan), 64))
    assert list(rows) == ["compute", "copy", "stall"] and len(rows["stall"]) == len(explicit)


def test_memory_rows_per_segment():
    plan = make_plan(num_segments=3)
    headers, rows = report._memory_rows(plan)
    assert headers[:3] == ["up to", "weights", "retrieval head"]
    assert headers[-3:] == ["GPU total", "of GPU", "host pinned"]
    for row, entry in zip(rows, plan.prediction["memory_breakdown"]):
        assert row[headers.index("resident kv")] == f"{entry['resident_kv'] / GIB:.2f}"
        assert row[-1] == f"{entry['host_pinned'] / GIB:.2f}"


def test_memory_breakdown_as_one_dict_describes_the_last_segment():
    plan = make_plan(num_segments=3)
    weights = random.Random(1).uniform(10, 20) * GIB
    plan.prediction["memory_breakdown"] = {"weights_bytes": weights, "kv_bytes": 3.5 * GIB}
    headers, rows = report._memory_rows(plan)
    assert headers[1:3] == ["weights", "kv"]
    assert rows[-1][1:3] == [f"{weights / GIB:.2f}", "3.50"] and rows[0][1] == "-"
    assert rows[0][3] == f"{plan.segments[0].predicted['gpu_bytes'] / GIB:.2f}"


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
    for event in plan.prediction["timeline"]:     # mark the compute stream as the path
        event["critical"] = event["stream"] == "compute" and not event["label"].startswith("stall")
    text = _render(plan)
    assert "overlap" in text and "selection overlap 0.7" in text
    headers, rows = report._prediction_rows(plan)
    at = headers.index("overlap")
    assert headers[at - 1] == "tok/s" and all(row[at] == "0.70" for row in rows)
    assert "critical path (█ compute, ▓ copy): L0 > L1 > L2" in text
    assert "critical" in dict(report._gantt(report._timeline_events(plan), 64))
    assert "critical path" in report.render_report_markdown(plan)

"""The predicted decode-step timeline as the report draws it: stalls, a text Gantt, the critical path.

Events are the cost model's (latency.timeline): {stream, label, start_ms, end_ms, critical}, one
step at the plan's max-len; "compute" and "copy" streams, and explicit "stall ..." events where
the compute stream waits for a copy.
"""
from __future__ import annotations

from typing import Any

from rich.text import Text


def is_stall(event: dict[str, Any]) -> bool:
    return event["stream"] == "stall" or event["label"].lower().startswith("stall")


def find_stalls(events: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Where the compute stream waits for a copy: (label, start ms, duration ms); either an
    explicit 'stall ...' event or a gap between compute events (labelled by the op after it)."""
    stalls = [(e["label"], e["start_ms"], e["end_ms"] - e["start_ms"]) for e in events if is_stall(e)]
    busy_until = min((e["start_ms"] for e in events), default=0.0)
    for e in events:
        if e["stream"] != "compute":
            continue
        if e["start_ms"] > busy_until + 1e-9:
            stalls.append((f"before {e['label']}", busy_until, e["start_ms"] - busy_until))
        busy_until = max(busy_until, e["end_ms"])
    return sorted(stalls, key=lambda s: s[1])


def gantt(events: list[dict[str, Any]], width: int) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Per stream, then 'stall' (compute waiting): (name, [(first col, end col, index)]) in width."""
    if not events:
        return []
    t0 = min(e["start_ms"] for e in events)
    span = max(e["end_ms"] for e in events) - t0 or 1.0
    streams: dict[str, list[tuple[int, int, int]]] = {}

    def cell_of(e: dict[str, Any]) -> tuple[int, int, int]:
        first = int((e["start_ms"] - t0) / span * width)
        end = max(first + 1, int(round((e["end_ms"] - t0) / span * width)))
        return first, min(end, width), 0

    for e in events:
        if is_stall(e):
            continue
        cells = streams.setdefault(e["stream"], [])
        first, end, _ = cell_of(e)
        cells.append((first, end, len(cells)))
    stall_cells = [(int((start - t0) / span * width),
                    max(int((start - t0) / span * width) + 1, int(round((start + ms - t0) / span * width))), 0)
                   for _, start, ms in find_stalls(events)]
    if stall_cells:
        streams["stall"] = stall_cells
    # the critical path's row: █ where a compute-stream operation sets the step, ▓ a copy
    critical = [(*cell_of(e)[:2], int(e["stream"] != "compute")) for e in events if e.get("critical")]
    if critical:
        streams["critical"] = critical
    order = {"compute": 0, "copy": 1, "stall": 3, "critical": 4}
    return sorted(streams.items(), key=lambda item: order.get(item[0], 2))


def gantt_text(cells: list[tuple[int, int, int]], width: int, colors: tuple[str, str]) -> Text:
    text = Text("·" * width, style="dim")
    for first, end, index in cells:
        # alternate glyph and colour so neighbouring layers stay distinguishable
        glyph = "█" if index % 2 == 0 else "▓"
        text = text[:first] + Text(glyph * (end - first), style=colors[index % 2]) + text[end:]
    return text


def critical_path_line(events: list[dict[str, Any]]) -> str:
    """'critical path: retrieval > top-k > diff > gather L20..L31 > layer 31 > lm head', or ''."""
    from specontext_compiler.cost_models.latency import describe_path
    path = [e["label"] for e in sorted(events, key=lambda e: e["start_ms"]) if e.get("critical")]
    return f"critical path (█ compute, ▓ copy): {describe_path(path)}" if path else ""

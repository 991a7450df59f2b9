"""Rich tables (and Markdown) of an EvalResult: recall by method and budget, head layers, passkey."""
from __future__ import annotations

from rich.table import Table


def _budgets(result) -> list[int]:
    return sorted({b for table in (result.recall, result.head_layers) for per in table.values() for b in per})


def recall_table(result) -> Table | None:
    """Mean attention recall (over layers) and the worst layer's, per method and budget."""
    if not result.recall:
        return None
    table = Table(title="Attention recall (mean over layers / worst layer)")
    table.add_column("method")
    for budget in _budgets(result):
        table.add_column(f"B={budget}", justify="right")
    for method, per in result.recall.items():
        table.add_row(method, *[f"{sum(v) / len(v):.3f} / {min(v):.3f}" for v in per.values()])
    return table


def head_rows(result) -> tuple[list[str], list[list[str]]]:
    """Head comparison: (columns, rows) with parameters, spec-head recall per budget and passkey cells."""
    budgets = _budgets(result)
    reports = result.meta.get("heads", {}) if isinstance(result.meta, dict) else {}
    main = result.meta.get("head_name") if isinstance(result.meta, dict) else None
    spec = [r for r in result.passkey if r["method"] == "spec-head"]
    length = max((r["length"] for r in spec), default=None)
    budget = max((r["budget"] for r in spec), default=None)
    columns = ["head", "params (no embedding)", "reduction"] + [f"recall B={b}" for b in budgets]
    if spec:
        columns.append(f"passkey {length} tok / B={budget}")
    rows = []
    for name in sorted(set(result.head_layers) | set(reports)):
        report, per = reports.get(name, {}), result.head_layers.get(name, {})
        row = [name, f"{report['params']:,}" if report else "-",
               f"{100 * report['reduction']:.1f}%" if report else "-"]
        row += [f"{per[b]:.3f}" if b in per else "-" for b in budgets]
        if spec:
            hits = [r["correct"] for r in spec if r["length"] == length and r["budget"] == budget
                    and (r.get("head") or "main") in (name, "main" if name == main else None)]
            row.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
        rows.append(row)
    return columns, rows


def head_layer_table(result) -> Table | None:
    """spec-head recall (and passkey) for the compared retrieval heads, with their sizes."""
    if not result.head_layers:
        return None
    columns, rows = head_rows(result)
    table = Table(title="spec-head by retrieval head")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _label(record, main) -> str:
    head = record.get("head")
    return record["method"] if head in (None, "main", main) else f"{record['method']} [{head}]"


def passkey_rows(result) -> list[tuple[str, str, list[str]]]:
    """(method, budget, accuracy per length as text) rows; full attention once; spec-* per head."""
    main = result.meta.get("head_name") if isinstance(result.meta, dict) else None
    lengths = sorted({r["length"] for r in result.passkey})
    keys = sorted({(_label(r, main), r["budget"] or 0) for r in result.passkey},
                  key=lambda mb: (mb[0] != "full", mb[1], mb[0]))
    rows = []
    for label, budget in keys:
        cells = []
        for length in lengths:
            hits = [r["correct"] for r in result.passkey if _label(r, main) == label and r["length"] == length
                    and (r["budget"] or 0) == budget]
            cells.append(f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})" if hits else "-")
        rows.append((label, "-" if label == "full" else str(budget), cells))
    return rows


def question_title(result) -> str:
    """How the question was asked; results written before the option existed decoded it."""
    mode = result.passkey[0].get("question", "decode") if result.passkey else "prompt"
    return "question in the prefilled prompt" if mode == "prompt" else "question fed as sparse decode steps"


def passkey_table(result) -> Table | None:
    """Passkey exact-match accuracy per method, budget and context length."""
    if not result.passkey:
        return None
    table = Table(title=f"Passkey exact match (all depths; {question_title(result)})")
    table.add_column("method")
    table.add_column("budget", justify="right")
    for length in sorted({r["length"] for r in result.passkey}):
        table.add_column(f"{length} tokens", justify="right")
    for method, budget, cells in passkey_rows(result):
        table.add_row(method, budget, *cells)
    return table


def markdown(result) -> str:
    """The same three tables as GitHub Markdown (for benchmarks/ACCURACY.md)."""
    out, budgets = [], _budgets(result)
    if result.recall:
        out += ["| method | " + " | ".join(f"B={b}" for b in budgets) + " |",
                "|---|" + "---:|" * len(budgets)]
        out += [f"| {m} | " + " | ".join(f"{sum(v) / len(v):.3f} / {min(v):.3f}" for v in per.values()) + " |"
                for m, per in result.recall.items()]
        out.append("")
    if result.head_layers:
        columns, rows = head_rows(result)
        out += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    if result.passkey:
        lengths = sorted({r["length"] for r in result.passkey})
        out += [f"Passkey, {question_title(result)}:", ""]
        out += ["| method | budget | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                "|---|---:|" + "---:|" * len(lengths)]
        out += [f"| {m} | {b} | " + " | ".join(c) + " |" for m, b, c in passkey_rows(result)]
    return "\n".join(out)

"""Rich tables (and Markdown) of an EvalResult: recall by method and budget, head layers, passkey."""
from __future__ import annotations

from rich.table import Table


def _budgets(result) -> list[int]:
    return sorted({b for per in result.recall.values() for b in per})


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


def head_layer_table(result) -> Table | None:
    """spec-head recall for heads derived from different LLM layers."""
    if not result.head_layers:
        return None
    table = Table(title="spec-head recall by retrieval-head source")
    table.add_column("head")
    budgets = _budgets(result)
    for budget in budgets:
        table.add_column(f"B={budget}", justify="right")
    for name, per in sorted(result.head_layers.items()):
        table.add_row(name, *[f"{per[b]:.3f}" if b in per else "-" for b in budgets])
    return table


def passkey_rows(result) -> list[tuple[str, str, list[str]]]:
    """(method, budget, accuracy per length as text) rows; full attention once."""
    lengths = sorted({r["length"] for r in result.passkey})
    keys = sorted({(r["method"], r["budget"] or 0) for r in result.passkey},
                  key=lambda mb: (mb[0] != "full", mb[1], mb[0]))
    rows = []
    for method, budget in keys:
        cells = []
        for length in lengths:
            hits = [r["correct"] for r in result.passkey if r["method"] == method and r["length"] == length
                    and (r["budget"] or 0) == budget]
            cells.append(f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})")
        rows.append((method, "-" if method == "full" else str(budget), cells))
    return rows


def passkey_table(result) -> Table | None:
    """Passkey exact-match accuracy per method, budget and context length."""
    if not result.passkey:
        return None
    table = Table(title="Passkey exact match (all depths)")
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
        out += ["| head | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
        out += [f"| {h} | " + " | ".join(f"{per[b]:.3f}" if b in per else "-" for b in budgets) + " |"
                for h, per in sorted(result.head_layers.items())]
        out.append("")
    if result.passkey:
        lengths = sorted({r["length"] for r in result.passkey})
        out += ["| method | budget | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                "|---|---:|" + "---:|" * len(lengths)]
        out += [f"| {m} | {b} | " + " | ".join(c) + " |" for m, b, c in passkey_rows(result)]
    return "\n".join(out)

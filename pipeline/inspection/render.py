"""Print inspection tables: fixed-width text (default), JSON, or CSV (one table)."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from pipeline.inspection.table import Summary, Table


def format_value(value: Any, kind: str) -> str:
    """One cell as text: rates in percent, floats with 4 significant digits, None as ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "rate":
        return f"{100 * value:.1f}%"
    if kind == "float":
        return f"{value:.4g}"
    if kind == "int":
        return str(int(value))
    return str(value)


def table_text(table: Table, top: int | None = None) -> str:
    """A table as aligned text: numbers right-aligned, text left-aligned.

    A ranked table longer than ``2 * top`` rows shows its first and last ``top`` rows.
    """
    rows = table.rows
    elided = 0
    if table.ranked and top and len(rows) > 2 * top:
        elided = len(rows) - 2 * top
        rows = rows[:top] + rows[-top:]
    cells = [[format_value(r.get(c.name), c.kind) for c in table.columns] for r in rows]
    widths = [max([len(c.name)] + [len(row[i]) for row in cells])
              for i, c in enumerate(table.columns)]

    def line(values: list[str]) -> str:
        out = []
        for v, w, col in zip(values, widths, table.columns):
            out.append(v.ljust(w) if col.kind == "str" else v.rjust(w))
        return "  ".join(out).rstrip()

    lines = [table.title, line([c.name for c in table.columns]),
             "  ".join("-" * w for w in widths)]
    for i, row in enumerate(cells):
        if elided and i == top:
            lines.append(f"... {elided} more {'row' if elided == 1 else 'rows'} (--json or "
                         f"--csv --table {table.name} for all) ...")
        lines.append(line(row))
    if not cells:
        lines.append("(no rows)")
    if table.note:
        lines.append(f"({table.note})")
    return "\n".join(lines)


def describe_filters(filters: dict[str, Any]) -> str:
    """``class=cat,dog decision=accepted where=(score > 0)``, or ``none``."""
    parts = [f"{k}={','.join(v)}" if isinstance(v, list) else f"{k}=({v})"
             for k, v in filters.items()]
    return " ".join(parts) or "none"


def summary_text(summary: Summary, top: int = 5) -> str:
    """The whole inspection as text: a header line, then each table, then notes."""
    filters = describe_filters(summary.filters)
    header = (f"{summary.uri}: {summary.total_rows} decisions in {summary.files} shard files; "
              f"filters: {filters}; {summary.selected_rows} rows selected")
    parts = [header] + [table_text(t, top) for t in summary.tables]
    parts += [f"note: {n}" for n in summary.notes]
    return "\n\n".join(parts) + "\n"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_json(summary: Summary) -> str:
    """The inspection as JSON: header fields, ``tables`` by name (rows as records), notes."""
    doc = {
        "uri": summary.uri,
        "files": summary.files,
        "total_rows": summary.total_rows,
        "selected_rows": summary.selected_rows,
        "filters": summary.filters,
        "tables": {
            t.name: {"title": t.title, "note": t.note,
                     "rows": [{k: _json_value(v) for k, v in r.items()} for r in t.records()]}
            for t in summary.tables
        },
        "notes": summary.notes,
    }
    return json.dumps(doc, indent=2, default=str) + "\n"


def table_csv(table: Table) -> str:
    """One table as CSV with a header row; rates stay fractions, missing values empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.name for c in table.columns])
    for r in table.records():
        writer.writerow(["" if _json_value(v) is None else v for v in r.values()])
    return buf.getvalue()

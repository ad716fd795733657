"""The registry of ``bsgal inspect``'s tables: a name, its builder, and the note shown when a
selection cannot have it; :func:`summarize` computes the asked ones.

The names are :data:`pipeline.inspection.TABLE_NAMES` (kept there so that the CLI lists
them without loading DuckDB); a test checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.inspection import TABLE_NAMES
from pipeline.inspection.costs import NO_COSTS, cost_by_class, cost_by_stage
from pipeline.inspection.feedback import NO_OPTIONS, option_acceptance
from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.summary import (
    acceptance_over_steps,
    class_acceptance,
    decision_counts,
    frequency_groups,
    matching_rows,
    score_quantiles,
    truth_by_failure,
    truth_precision_recall,
)
from pipeline.inspection.table import Summary, Table
from pipeline.inspection.thresholds import NO_THRESHOLDS, class_thresholds

NO_TRUTH = ("precision/recall skipped: no generator truth in these rows (truth_failure is "
            "empty, e.g. Stable Diffusion candidates)")

#: name -> (builder of the table over a query, with the step bins and the row limit; the note
#: shown when the builder returns None).
TABLES: dict[str, tuple[Callable[[DecisionQuery, int, int], Table | None], str]] = {
    "counts": (lambda q, bins, limit: decision_counts(q), ""),
    "groups": (lambda q, bins, limit: frequency_groups(q), ""),
    "classes": (lambda q, bins, limit: class_acceptance(q), ""),
    "scores": (lambda q, bins, limit: score_quantiles(q), ""),
    "thresholds": (lambda q, bins, limit: class_thresholds(q), NO_THRESHOLDS),
    "steps": (lambda q, bins, limit: acceptance_over_steps(q, bins), ""),
    "truth": (lambda q, bins, limit: truth_precision_recall(q), NO_TRUTH),
    "truth_failures": (lambda q, bins, limit: truth_by_failure(q), NO_TRUTH),
    "cost": (lambda q, bins, limit: cost_by_stage(q), NO_COSTS),
    "cost_classes": (lambda q, bins, limit: cost_by_class(q), NO_COSTS),
    "options": (lambda q, bins, limit: option_acceptance(q), NO_OPTIONS),
    "rows": (lambda q, bins, limit: matching_rows(q, limit), ""),
}


def summarize(q: DecisionQuery, names: tuple[str, ...] | None = None, step_bins: int = 10,
              row_limit: int = 20) -> Summary:
    """Compute the tables ``names`` (default: all except ``rows``) over ``q``'s selection."""
    wanted = tuple(names) if names else tuple(n for n in TABLE_NAMES if n != "rows")
    tables: list[Table] = []
    notes: list[str] = []
    for name in wanted:
        build, note = TABLES[name]
        table = build(q, step_bins, row_limit)
        if table is None:
            if note not in notes:
                notes.append(note)
            continue
        tables.append(table)
    selected = q.count()
    if not selected:
        notes.append("no decision matches the filters")
    return Summary(uri=q.uri, files=len(q.files), total_rows=q.count("decisions"),
                   selected_rows=selected, filters=q.filters.describe(), tables=tables,
                   notes=notes)


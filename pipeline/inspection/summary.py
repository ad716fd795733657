"""The tables of ``bsgal inspect``: what was accepted and rejected, and why.

Every table is computed by DuckDB over the ``selected`` view of a
:class:`~pipeline.inspection.query.DecisionQuery` (the filtered decisions), so it scales with
the number of rows without loading images. Rates are fractions in [0, 1] (printed as percent
in text); ``None`` means "not defined" (no rows to divide by).

Acceptance rates come in two forms: ``accept_rate`` = accepted / all candidates, and
``accept_rate_scored`` = accepted / (accepted + rejected), which leaves out the candidates that
failed a quality check before the selector saw them (``invalid_*``).
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.table import FREQUENCY_NAMES, Column, Table

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

# Per-decision counts, reused by several tables.
_COUNTS = (
    "count(*) AS total, "
    "count(*) FILTER (WHERE decision = 'accepted') AS accepted, "
    "count(*) FILTER (WHERE decision = 'rejected') AS rejected, "
    "count(*) FILTER (WHERE decision = 'invalid') AS invalid"
)


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _with_rates(row: dict[str, Any]) -> dict[str, Any]:
    row["accept_rate"] = _rate(row["accepted"], row["total"])
    row["accept_rate_scored"] = _rate(row["accepted"], row["accepted"] + row["rejected"])
    return row


_RATE_COLUMNS = [Column("total", "int"), Column("accepted", "int"), Column("rejected", "int"),
                 Column("invalid", "int"), Column("accept_rate", "rate"),
                 Column("accept_rate_scored", "rate")]


# ------------------------------------------------------------------------------------ tables


def decision_counts(q: DecisionQuery) -> Table:
    """Rows per decision and reason, with each one's share of all selected rows."""
    rows = q.rows(
        "SELECT decision, reason, count(*) AS n FROM selected GROUP BY decision, reason "
        "ORDER BY CASE decision WHEN 'accepted' THEN 0 WHEN 'rejected' THEN 1 ELSE 2 END, "
        "n DESC, reason")
    total = sum(r["n"] for r in rows)
    for r in rows:
        r["share"] = _rate(r["n"], total)
    return Table("counts", "Decisions by reason",
                 [Column("decision"), Column("reason"), Column("n", "int"),
                  Column("share", "rate")], rows)


def frequency_groups(q: DecisionQuery) -> Table:
    """Acceptance per LVIS frequency group (frequent / common / rare)."""
    rows = q.rows(
        f"SELECT class_frequency, count(DISTINCT class_id) AS classes, {_COUNTS} "
        "FROM selected GROUP BY class_frequency "
        "ORDER BY CASE class_frequency WHEN 'f' THEN 0 WHEN 'c' THEN 1 WHEN 'r' THEN 2 "
        "ELSE 3 END, class_frequency")
    for r in rows:
        r["group"] = FREQUENCY_NAMES.get(r["class_frequency"], r["class_frequency"])
        _with_rates(r)
    return Table("groups", "Acceptance by frequency group",
                 [Column("group"), Column("classes", "int"), *_RATE_COLUMNS], rows)


def class_acceptance(q: DecisionQuery) -> Table:
    """Acceptance per class, most accepted first (ties: more candidates first)."""
    rows = q.rows(
        f"SELECT class_id, class_name, class_frequency, {_COUNTS} FROM selected "
        "GROUP BY class_id, class_name, class_frequency")
    for r in rows:
        r["group"] = FREQUENCY_NAMES.get(r["class_frequency"], r["class_frequency"])
        _with_rates(r)
    rows.sort(key=lambda r: (-(r["accept_rate"] or 0.0), -r["total"], r["class_name"]))
    return Table("classes", "Acceptance by class (most accepted first)",
                 [Column("class_id", "int"), Column("class_name"), Column("group"),
                  *_RATE_COLUMNS], rows, ranked=True)


def score_quantiles(q: DecisionQuery) -> Table:
    """Quantiles of the selector's score (all scored, accepted, rejected) and of the threshold.

    Only finite values count: invalid candidates have no score (NaN).
    """
    qs = "[" + ", ".join(str(x) for x in QUANTILES) + "]"
    parts = [
        ("score (scored)", "score", "decision <> 'invalid'"),
        ("score (accepted)", "score", "decision = 'accepted'"),
        ("score (rejected)", "score", "decision = 'rejected'"),
        ("threshold", "threshold", "decision <> 'invalid'"),
    ]
    rows = []
    for label, col, cond in parts:
        r = q.rows(
            f"SELECT count({col}) AS n, min({col}) AS min, max({col}) AS max, "
            f"avg({col}) AS mean, quantile_cont({col}, {qs}) AS qs FROM selected "
            f"WHERE {cond} AND isfinite({col})")[0]
        qv = r.pop("qs") or [None] * len(QUANTILES)
        r.update({_qname(x): v for x, v in zip(QUANTILES, qv)})
        r["value"] = label
        rows.append(r)
    columns = [Column("value"), Column("n", "int"), Column("min", "float"),
               *[Column(_qname(x), "float") for x in QUANTILES], Column("max", "float"),
               Column("mean", "float")]
    return Table("scores", "Score and threshold quantiles", columns, rows)


def _qname(x: float) -> str:
    return f"p{round(100 * x):02d}"


def acceptance_over_steps(q: DecisionQuery, bins: int = 10) -> Table:
    """Acceptance per range of training steps (``bins`` ranges of equal width)."""
    lo, hi, unknown = q.con.execute(
        "SELECT min(step) FILTER (WHERE step >= 0), max(step) FILTER (WHERE step >= 0), "
        "count(*) FILTER (WHERE step < 0 OR step IS NULL) FROM selected").fetchone()
    note = f"{unknown} rows without a step left out" if unknown else ""
    columns = [Column("step_from", "int"), Column("step_to", "int"), *_RATE_COLUMNS,
               Column("threshold_median", "float")]
    if lo is None:
        return Table("steps", "Acceptance over training steps", columns, [],
                     note or "no rows with a training step")
    width = max(1, math.ceil((hi - lo + 1) / max(1, bins)))
    rows = q.rows(
        f"SELECT (step - {lo}) // {width} AS bin, {_COUNTS}, "
        "median(threshold) FILTER (WHERE isfinite(threshold) AND decision <> 'invalid') "
        "AS threshold_median FROM selected WHERE step >= 0 GROUP BY bin ORDER BY bin")
    for r in rows:
        r["step_from"] = lo + r["bin"] * width
        r["step_to"] = min(hi, lo + (r["bin"] + 1) * width - 1)
        _with_rates(r)
    return Table("steps", "Acceptance over training steps", columns, rows, note)


def truth_precision_recall(q: DecisionQuery) -> Table | None:
    """Precision and recall of acceptance against the generator's truth, or None if unknown.

    A candidate is *good* when ``truth_failure == "none"`` (the generator drew what was asked,
    whole and clean). Precision = good accepted / accepted; recall = good accepted / good.
    Scope ``all`` counts every candidate with a known truth (invalid ones are not accepted);
    scope ``scored`` only those the selector scored, i.e. the selector's own quality.
    """
    (known,) = q.con.execute(
        "SELECT count(*) FROM selected WHERE truth_failure <> ''").fetchone()
    if not known:
        return None
    rows = []
    for scope, cond in (("all", "TRUE"), ("scored", "decision <> 'invalid'")):
        r = q.rows(
            "SELECT count(*) AS known, "
            "count(*) FILTER (WHERE truth_failure = 'none') AS good, "
            "count(*) FILTER (WHERE decision = 'accepted') AS accepted, "
            "count(*) FILTER (WHERE decision = 'accepted' AND truth_failure = 'none') "
            "AS good_accepted FROM selected "
            f"WHERE truth_failure <> '' AND {cond}")[0]
        r["scope"] = scope
        r["precision"] = _rate(r["good_accepted"], r["accepted"])
        r["recall"] = _rate(r["good_accepted"], r["good"])
        r["good_rate"] = _rate(r["good"], r["known"])
        rows.append(r)
    (unknown,) = q.con.execute(
        "SELECT count(*) FROM selected WHERE truth_failure = ''").fetchone()
    note = "good = the generator's truth_failure is 'none'"
    if unknown:
        note += f"; {unknown} rows without truth left out"
    return Table("truth", "Acceptance against the generator's truth",
                 [Column("scope"), Column("known", "int"), Column("good", "int"),
                  Column("accepted", "int"), Column("good_accepted", "int"),
                  Column("precision", "rate"), Column("recall", "rate"),
                  Column("good_rate", "rate")], rows, note)


def truth_by_failure(q: DecisionQuery) -> Table | None:
    """Acceptance per kind of generator failure (``none`` = a good sample), or None."""
    rows = q.rows(
        f"SELECT truth_failure, {_COUNTS} FROM selected WHERE truth_failure <> '' "
        "GROUP BY truth_failure ORDER BY truth_failure <> 'none', truth_failure")
    if not rows:
        return None
    for r in rows:
        _with_rates(r)
    return Table("truth_failures", "Acceptance by the generator's failure kind",
                 [Column("truth_failure"), *_RATE_COLUMNS], rows)


def matching_rows(q: DecisionQuery, limit: int = 20) -> Table:
    """The selected decisions themselves (no image bytes), in stream order."""
    limit_sql = f" LIMIT {int(limit)}" if limit and limit > 0 else ""
    columns = [Column("sample_id"), Column("class_id", "int"), Column("class_name"),
               Column("decision"), Column("reason"), Column("score", "float"),
               Column("threshold", "float"), Column("step", "int"), Column("rank", "int"),
               Column("truth_failure"), Column("prompt")]
    rows = q.rows(
        "SELECT " + ", ".join(c.name for c in columns) + " FROM selected "
        "ORDER BY step, rank, stream_offset" + limit_sql)
    total = q.count()
    note = f"first {len(rows)} of {total} rows" if len(rows) < total else ""
    return Table("rows", "Matching decisions", columns, rows, note)

"""The closed loop read back: acceptance by prompt option, the loop's lag, allocation over time.

From the shards (schema 2.3 columns ``prompt_option``, ``allocation_step``, ``step``):
:func:`option_acceptance` (decided and accepted candidates per class and prompt option) and
:func:`loop_lag` (trainer steps between the allocation a candidate was drawn with and its
decision). From ``metrics.jsonl``: :func:`allocation_history`, the ``allocation`` records rank 0
writes every ``output.log_every`` steps (each class's share of generation then).
"""

from __future__ import annotations

from typing import Any

from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.table import Column, Table

NO_OPTIONS = ("no prompt options in these shards (written before shard schema 2.3, or drawn "
              "from a pool)")


def option_acceptance(q: DecisionQuery) -> Table | None:
    """Per prompt option and class: candidates, accepted, acceptance rate; the prompt text of
    each option is its most frequent prompt (None without ``prompt_option``)."""
    if "prompt_option" not in q.columns():
        return None
    rows = q.rows(
        "SELECT prompt_option AS option, count(*) AS total, "
        "count(*) FILTER (WHERE decision = 'accepted') AS accepted, "
        "count(DISTINCT class_id) AS classes, mode(prompt) AS example "
        "FROM selected WHERE prompt_option IS NOT NULL AND prompt_option >= 0 "
        "GROUP BY 1 ORDER BY 1")
    if not rows:
        return None
    for r in rows:
        r["accept_rate"] = r["accepted"] / r["total"] if r["total"] else None
    return Table("options", "Acceptance by prompt option (0.. = the templates, then the extra "
                 "prompts)", [Column("option", "int"), Column("total", "int"),
                              Column("accepted", "int"), Column("accept_rate", "rate"),
                              Column("classes", "int"), Column("example")], rows)


def loop_lag(q: DecisionQuery) -> dict[str, Any] | None:
    """Steps from allocation to decision over the closed-loop rows: ``rows``, ``median``,
    ``p95``, ``max`` (None when no row was drawn with an allocation)."""
    if "allocation_step" not in q.columns():
        return None
    r = q.rows("SELECT count(*) AS rows, median(step - allocation_step) AS median, "
               "quantile_cont(step - allocation_step, 0.95) AS p95, "
               "max(step - allocation_step) AS max "
               "FROM selected WHERE allocation_step IS NOT NULL AND allocation_step >= 0 "
               "AND step >= 0")[0]
    if not r["rows"]:
        return None
    return {"rows": int(r["rows"]), "median": float(r["median"]), "p95": float(r["p95"]),
            "max": int(r["max"])}


def open_loop_rows(q: DecisionQuery) -> int:
    """Rows of a closed-loop run drawn open loop (``allocation_step`` -1: before the first
    decision, or while the demand actor did not answer)."""
    if "allocation_step" not in q.columns():
        return 0
    return int(q.rows("SELECT count(*) AS n FROM selected WHERE allocation_step < 0")[0]["n"])


def allocation_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``allocation`` metrics records as ``{step, shares: {class: share}, stopped,
    unavailable}`` in step order."""
    out = []
    for r in records:
        if r.get("kind") != "allocation":
            continue
        shares = {name: float(c.get("share", 0.0)) for name, c in (r.get("classes") or {}).items()}
        out.append({"step": int(r.get("step", 0)), "shares": shares,
                    "stopped": list(r.get("stopped") or []),
                    "unavailable": r.get("unavailable")})
    return sorted(out, key=lambda h: h["step"])


def feedback_summary(q: DecisionQuery, closed_loop: bool) -> dict[str, Any] | None:
    """The run summary's ``feedback``: the lag and the acceptance by prompt option (None for an
    open-loop run: ``closed_loop`` False, from its config); ``engaged`` is False for a
    closed-loop run whose decisions never reached generation (every candidate drawn open
    loop)."""
    if not closed_loop or "allocation_step" not in q.columns():
        return None
    lag = loop_lag(q)
    open_rows = open_loop_rows(q)
    if lag is None:
        if not open_rows:
            return None
        return {"engaged": False, "lag_steps": None, "open_loop_rows": open_rows,
                "rows": q.count(), "options": []}
    options = option_acceptance(q)
    return {"engaged": True, "lag_steps": lag, "open_loop_rows": open_rows, "rows": q.count(),
            "options": options.records() if options is not None else []}


def feedback_line(feedback: dict[str, Any] | None) -> str | None:
    """One line for the printed summary (and why, when the loop never engaged)."""
    if not feedback:
        return None
    if not feedback.get("engaged", True):
        return (f"closed loop: never engaged: all {feedback['open_loop_rows']} candidates were "
                "drawn before a decision reached generation (generation ran that far ahead of "
                "training at these sizes); lower feedback.max_ahead or generation.batch_size, "
                "or make more candidates (generation.num_candidates)")
    lag = feedback["lag_steps"]
    parts = ", ".join(f"option {o['option']} {100 * (o['accept_rate'] or 0):.0f}%"
                      for o in feedback["options"])
    total = feedback.get("rows")
    engaged = (f"engaged after {feedback['open_loop_rows']} of {total} candidates; "
               if total else f"{feedback['open_loop_rows']} candidates drawn open loop; ")
    return (f"closed loop: {engaged}decisions reached generation within {lag['median']:.0f} "
            f"steps (median; max {lag['max']}); accepted by prompt option: {parts or '-'}")


def run_metrics(uri: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records of the run folder ``uri`` (or of the run whose ``shards``
    folder it is); empty when there is no metrics log or it cannot be read."""
    from pipeline.storage.run_dir import RunDir, read_metrics

    root = uri.rstrip("/")
    if root.endswith("/shards"):
        root = root[: -len("/shards")]
    try:
        return read_metrics(RunDir(root, storage_options or {}))
    except Exception:  # noqa: BLE001 - the report and tables are still useful without it
        return []


def run_allocation_history(uri: str, storage_options: dict | None = None
                           ) -> list[dict[str, Any]]:
    """:func:`allocation_history` of the run folder ``uri`` (`run_metrics`)."""
    return allocation_history(run_metrics(uri, storage_options))

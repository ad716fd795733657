"""Per class, the threshold the candidates met beside the scores it was set from.

From the shards: each class's scored candidates, their median score, the median threshold in
force and the share kept. From ``metrics.jsonl`` (calibrated threshold only): the latest
``calibration`` record of rank 0 (written every ``output.log_every`` steps), i.e. per class
how many real-instance scores its reference held, their median and 5th percentile, and whether
the class had a reference of its own or was judged against the pool of every class's.
"""

from __future__ import annotations

from typing import Any

from pipeline.inspection.feedback import run_metrics
from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.table import Column, Table

NO_THRESHOLDS = "no scored candidate in the selection: no threshold to show"


def latest_calibration(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """The classes of the last rank-0 ``calibration`` record ({class id: summary})."""
    found = [r for r in records if r.get("kind") == "calibration" and not r.get("rank")]
    if not found:
        return {}
    last = max(found, key=lambda r: int(r.get("step") or 0))
    return {int(c): v for c, v in (last.get("classes") or {}).items()}


def class_thresholds(q: DecisionQuery) -> Table | None:
    """Per class: candidates scored, median score, median threshold, kept share and (with a
    calibrated threshold) the real-instance reference; None when nothing was scored."""
    rows = q.rows(
        "SELECT class_id, class_name, count(*) AS scored, "
        "count(*) FILTER (WHERE decision = 'accepted') AS accepted, "
        "median(score) AS score_median, median(threshold) FILTER (WHERE isfinite(threshold)) "
        "AS threshold_median FROM selected WHERE decision <> 'invalid' AND isfinite(score) "
        "GROUP BY class_id, class_name ORDER BY scored DESC, class_name")
    if not rows:
        return None
    reference = latest_calibration(run_metrics(q.uri, q.storage_options))
    for r in rows:
        r["kept"] = r["accepted"] / r["scored"] if r["scored"] else None
        ref = reference.get(int(r["class_id"]), {})
        r["reference_scores"] = ref.get("reference_scores")
        r["reference_median"] = ref.get("reference_median")
        r["reference_p05"] = ref.get("reference_p05")
        r["reference"] = ("" if not ref else "own" if ref.get("own_reference") else "pooled")
    columns = [Column("class_id", "int"), Column("class_name"), Column("scored", "int"),
               Column("kept", "rate"), Column("score_median", "float"),
               Column("threshold_median", "float")]
    if reference:
        columns += [Column("reference"), Column("reference_scores", "int"),
                    Column("reference_median", "float"), Column("reference_p05", "float")]
    note = ("reference: the latest calibration record's real-instance scores per class "
            "(own: the class's; pooled: too few of its own, judged against every class's)"
            if reference else "")
    return Table("thresholds", "Thresholds per class, beside the scores they were set from",
                 columns, rows, note=note)

"""The one builder of a decision row: a candidate's columns, its decision, its costs and the
run's fields (docs/contracts.md, Decision). The train worker and ``bsgal rescore`` both use it,
so a shard row means the same whoever wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from annotators.checks import check_fields
from pipeline.run.costs import row_costs
from pipeline.storage.shard_schema import ENCODED_FIELDS, shard_schema
from trainer.candidates import DECISION_FIELDS

#: Shard fields the run fills in (not copied from the candidate).
RUN_FIELDS = ("run_id", "class_frequency", "judged_by")


def candidate_columns() -> tuple[str, ...]:
    """Candidate columns copied into a decision row: the shard's fields (the schema built now,
    with the registered checks' fields) that are neither the trainer's decision, the run's,
    nor encoded by the writer (``image``/``mask`` are encoded)."""
    key = tuple(check_fields().items())
    if _COLUMNS.get("key") != key:
        _COLUMNS["key"] = key
        _COLUMNS["columns"] = tuple(
            name for name in shard_schema().names
            if name not in (*DECISION_FIELDS, *RUN_FIELDS, *ENCODED_FIELDS)) + ("image", "mask")
    return _COLUMNS["columns"]


_COLUMNS: dict[str, tuple] = {}


def decision_row(candidate: Mapping[str, Any], decision: Mapping[str, Any], *, run_id: str,
                 frequency: Mapping[int, str], devices: Mapping[str, tuple[str, float]],
                 units: str, trainer_seconds: Sequence[float] | None = None,
                 judged_by: str = "") -> dict[str, Any]:
    """One decision row.

    Args:
        candidate: the candidate's columns (one row of a stream batch: its stage timings
            ``_seconds_<stage>`` included).
        decision: `trainer.candidates.decision_record`'s fields.
        run_id: the run's name (``rescore:<name>`` for a rescoring).
        frequency: class id → LVIS frequency letter.
        devices, units: what each stage holds (`pipeline.run.costs.stage_devices`).
        trainer_seconds: the trainer's (scoring, training) seconds of the row, or None.
        judged_by: ``""`` for the run's own trainer, the checkpoint for a rescoring.
    """
    row = {k: candidate[k] for k in candidate_columns() if k in candidate}
    row.update(decision)
    row.update(row_costs(candidate, trainer_seconds, devices, units))
    row["run_id"] = run_id
    row["class_frequency"] = frequency.get(int(row.get("class_id", -1)), "")
    row["judged_by"] = judged_by
    return row


"""Where the device time went: the cost per accepted instance, by stage and by class.

Reads the ``cost_*`` columns of the shards (schema 2.2; device-seconds per stage and row, the
unit of each stage in ``cost_units``, see :mod:`pipeline.run.costs`). The cost of an accepted
instance is everything spent on the selected candidates, accepted or not, divided by the
accepted ones: a rejected candidate was paid for too. Real-only training steps (warm-up,
fillers) belong to no candidate and are not counted here (their time is in
``metrics.jsonl``).
"""

from __future__ import annotations

from typing import Any

from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.table import FREQUENCY_NAMES, Column, Table
from pipeline.storage.row_names import COST_STAGES

NO_COSTS = ("no cost columns in these shards (written before shard schema 2.2): the cost per "
            "accepted instance is unknown")


def has_costs(q: DecisionQuery) -> bool:
    """Whether the selection holds costed rows (the columns exist and some row has them:
    rows written without a cost hold NaN, "not measured")."""
    names = q.columns()
    if not all(f"cost_{s}" in names for s in COST_STAGES):
        return False
    return bool(q.rows("SELECT count(*) AS n FROM selected WHERE cost_train IS NOT NULL "
                       "AND NOT isnan(cost_train)")[0]["n"])


def _sums() -> str:
    return ", ".join(f"coalesce(sum(cost_{s}) FILTER (WHERE NOT isnan(cost_{s})), 0) AS {s}"
                     for s in COST_STAGES)


def _units(q: DecisionQuery) -> dict[str, str]:
    """Per stage, its unit (``GPU-s``/``CPU-s``; ``mixed`` when rows disagree)."""
    out = {}
    for stage in COST_STAGES:
        found = [r["u"] for r in q.rows(
            f"SELECT DISTINCT regexp_extract(cost_units, '{stage}=(\\w+)', 1) AS u "
            "FROM selected WHERE cost_units IS NOT NULL AND cost_units <> ''")]
        found = [u for u in found if u]
        out[stage] = f"{found[0]}-s" if len(found) == 1 else ("mixed" if found else "-")
    return out


def cost_by_stage(q: DecisionQuery) -> Table | None:
    """Device-seconds per stage: total, share of all, per candidate and per accepted
    instance (None when the shards hold no costs)."""
    if not has_costs(q):
        return None
    sums = _sums()
    totals = q.rows(f"SELECT count(*) AS n, count(*) FILTER (WHERE decision = 'accepted') "
                    f"AS accepted, {sums} FROM selected")[0]
    units = _units(q)
    everything = sum(totals[s] for s in COST_STAGES)
    rows = []
    for stage in COST_STAGES:
        value = float(totals[stage])
        rows.append({"stage": stage, "unit": units[stage], "device_seconds": value,
                     "share": value / everything if everything else None,
                     "per_candidate": value / totals["n"] if totals["n"] else None,
                     "per_accepted": value / totals["accepted"] if totals["accepted"] else None})
    rows.append({"stage": "all", "unit": _all_unit(units), "device_seconds": everything,
                 "share": 1.0 if everything else None,
                 "per_candidate": everything / totals["n"] if totals["n"] else None,
                 "per_accepted": everything / totals["accepted"] if totals["accepted"] else None})
    return Table("cost", "Cost by stage (device-seconds; per accepted instance = all spent on "
                 "the selected candidates / the accepted ones)",
                 [Column("stage"), Column("unit"), Column("device_seconds", "float"),
                  Column("share", "rate"), Column("per_candidate", "float"),
                  Column("per_accepted", "float")], rows,
                 note="GPU-s where a stage holds GPUs, CPU-s (wall x CPUs held) otherwise")


def _all_unit(units: dict[str, str]) -> str:
    known = {u for u in units.values() if u != "-"}
    return known.pop() if len(known) == 1 else "mixed"


def cost_by_class(q: DecisionQuery) -> Table | None:
    """Per class: accepted instances and the device-seconds per accepted instance, by stage
    and in all; the most expensive first."""
    if not has_costs(q):
        return None
    sums = _sums()
    rows = q.rows(
        f"SELECT class_id, any_value(class_name) AS class_name, "
        f"any_value(class_frequency) AS class_frequency, count(*) AS total, "
        f"count(*) FILTER (WHERE decision = 'accepted') AS accepted, {sums} "
        "FROM selected GROUP BY class_id")
    for r in rows:
        r["group"] = FREQUENCY_NAMES.get(r["class_frequency"], r["class_frequency"])
        spent = sum(r[s] for s in COST_STAGES)
        r["device_seconds"] = spent
        for s in COST_STAGES:
            r[f"{s}_per_accepted"] = r[s] / r["accepted"] if r["accepted"] else None
        r["per_accepted"] = spent / r["accepted"] if r["accepted"] else None
    rows.sort(key=lambda r: (r["per_accepted"] is not None, r["per_accepted"] or 0.0,
                             r["device_seconds"]), reverse=True)
    return Table("cost_classes", "Cost per accepted instance by class (device-seconds)",
                 [Column("class_id", "int"), Column("class_name"), Column("group"),
                  Column("total", "int"), Column("accepted", "int"),
                  Column("device_seconds", "float"),
                  *(Column(f"{s}_per_accepted", "float") for s in COST_STAGES),
                  Column("per_accepted", "float")], rows,
                 note="a class with no accepted instance has no cost per accepted instance "
                      "(listed first)", ranked=True)


def cost_summary(q: DecisionQuery) -> dict[str, Any] | None:
    """The run summary's ``cost``: per stage (unit, device-seconds, per accepted instance)."""
    table = cost_by_stage(q)
    if table is None:
        return None
    return {r["stage"]: {"unit": r["unit"], "device_seconds": r["device_seconds"],
                         "per_accepted": r["per_accepted"]} for r in table.rows}


def cost_line(cost: dict[str, Any] | None) -> str | None:
    """One line: ``cost per accepted instance: 0.52 CPU-s (generate 0.04, ...)``."""
    if not cost or cost["all"]["per_accepted"] is None:
        return None
    parts = ", ".join(f"{s} {cost[s]['per_accepted']:.3g}" for s in COST_STAGES
                      if cost[s]["device_seconds"] > 0)
    unit = cost["all"]["unit"]
    unit = "device-s, units by stage in summary.json" if unit == "mixed" else unit
    return (f"cost per accepted instance: {cost['all']['per_accepted']:.3g} {unit} "
            f"({parts})")

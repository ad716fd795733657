"""Cost accounting: device-seconds per stage and row (pipeline/run/costs.py) and the cost per
accepted instance by stage and by class in `bsgal inspect`, the run summary and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.inspection.costs import (
    cost_by_class,
    cost_by_stage,
    cost_line,
    cost_summary,
)
from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.report import build_report
from pipeline.run.costs import row_costs, stage_devices, units_text
from pipeline.storage.shard_writer import ShardWriter
from tests.conftest import CONFIGS, invoke_cli
from tests.test_shards import _rows


def test_device_seconds_are_wall_seconds_times_the_devices_a_stage_holds() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", ["generation.num_gpus=1", "annotation.num_cpus=2",
                                              "training.num_cpus_per_worker=3"])
    devices = stage_devices(cfg, trainer_on_gpu=False)
    assert devices["generate"] == ("GPU", 1.0) and devices["annotate"] == ("CPU", 2.0)
    assert devices["score"] == devices["train"] == ("CPU", 3.0)
    assert stage_devices(cfg, trainer_on_gpu=True)["train"] == ("GPU", 1.0)
    units = units_text(devices)
    assert units.startswith("generate=GPU,annotate=CPU")
    row = {"_seconds_generate": 0.5, "_seconds_annotate": 0.25, "_seconds_check": 0.1}
    costs = row_costs(row, (0.2, 0.4), devices, units)
    assert costs.pop("cost_units") == units
    assert costs == pytest.approx({"cost_generate": 0.5, "cost_annotate": 0.5,
                                   "cost_check": 0.1 * devices["check"][1],
                                   "cost_score": 0.6, "cost_train": 1.2})
    # a stage the row never went through (a pool run has no annotation) costs 0
    assert row_costs({}, None, devices, units)["cost_annotate"] == 0.0


def _costed_run(out: Path) -> list[dict]:
    rows = _rows(20)
    for i, r in enumerate(rows):
        r.update(cost_generate=1.0, cost_annotate=0.5, cost_check=0.1, cost_score=0.2 * (i % 2),
                 cost_train=0.4, cost_units="generate=GPU,annotate=GPU,check=CPU,score=CPU,"
                                           "train=CPU")
    with ShardWriter(str(out)) as writer:
        writer.add(rows)
    return rows


def test_cost_per_accepted_instance_by_stage_and_class(tmp_path: Path) -> None:
    rows = _costed_run(tmp_path / "run")
    accepted = [r for r in rows if r["reason"] == "accepted"]
    with DecisionQuery(str(tmp_path / "run")) as q:
        stages = {r["stage"]: r for r in cost_by_stage(q).rows}
        classes = cost_by_class(q).rows
        summary = cost_summary(q)
    # everything spent, accepted or not, over the accepted ones
    assert stages["generate"]["per_accepted"] == pytest.approx(20 * 1.0 / len(accepted))
    assert stages["score"]["device_seconds"] == pytest.approx(0.2 * 10)
    assert stages["generate"]["unit"] == "GPU-s" and stages["train"]["unit"] == "CPU-s"
    assert stages["all"]["unit"] == "mixed"
    assert sum(s["share"] for n, s in stages.items() if n != "all") == pytest.approx(1.0)
    for c in classes:
        mine = [r for r in rows if r["class_id"] == c["class_id"]]
        ok = [r for r in mine if r["reason"] == "accepted"]
        spent = sum(r[f"cost_{s}"] for r in mine for s in
                    ("generate", "annotate", "check", "score", "train"))
        assert c["per_accepted"] == pytest.approx(spent / len(ok))
    line = cost_line(summary)
    assert line.startswith("cost per accepted instance: ") and "train" in line


def test_inspect_and_report_show_the_cost_and_old_shards_say_it_is_unknown(
        tmp_path: Path) -> None:
    _costed_run(tmp_path / "run")
    code, text = invoke_cli("inspect", str(tmp_path / "run"), "--table", "cost", "--json")
    assert code == 0, text
    doc = json.loads(text)
    assert [r["stage"] for r in doc["tables"]["cost"]["rows"]][-1] == "all"
    with DecisionQuery(str(tmp_path / "run")) as q:
        page, meta = build_report(q)
    assert 'id="cost-chart"' in page and page.count('class="cost-bar"') == 5
    assert 'id="cost-classes-table"' in page and meta["cost_per_accepted"] > 0
    # shards written before schema 2.2: no cost columns at all
    with ShardWriter(str(tmp_path / "old")) as writer:
        writer.add(_rows(5))
    import pyarrow.parquet as pq

    from pipeline.storage.shards import list_shard_files

    for path in list_shard_files(str(tmp_path / "old" / "shards")):
        table = pq.read_table(path)
        pq.write_table(table.drop([c for c in table.column_names if c.startswith("cost_")])
                       .replace_schema_metadata({b"bsgal.schema_version": b"2"}), path)
    code, text = invoke_cli("inspect", str(tmp_path / "old"))
    assert code == 0 and "cost per accepted instance is unknown" in text, text
    with DecisionQuery(str(tmp_path / "old")) as q:
        page, meta = build_report(q)
    assert "cost-chart" not in page and meta["cost_per_accepted"] is None

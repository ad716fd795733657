"""`bsgal rescore` on a real local Ray: a demo-sized run judged again by two of its
checkpoints, without training; each rescoring leaves one row per stored candidate that names
its checkpoint, the two disagree on some candidates, and `bsgal inspect --compare` says which
rejections became acceptances and for which classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

from pipeline.storage.run_dir import RunDir  # noqa: E402
from pipeline.storage.shards import read_decisions  # noqa: E402
from tests.conftest import invoke_cli  # noqa: E402

COLUMNS = ["sample_id", "class_id", "class_name", "decision", "reason", "accepted", "score",
           "step", "judged_by", "source", "source_id", "stream_offset", "image_png"]


@pytest.fixture(scope="module")
def demo_run(demo_ray_run: dict) -> Path:
    """The session's demo-sized Ray run (tests/conftest.py)."""
    # the demo summary's cost line (item 4)
    text = demo_ray_run["output"]
    assert "cost per accepted instance: " in text and " CPU-s (generate " in text, text
    return demo_ray_run["out"]


def test_every_row_of_the_run_records_what_each_stage_cost(demo_run: Path) -> None:
    rows = read_decisions(str(demo_run), columns=[
        "decision", "cost_generate", "cost_annotate", "cost_check", "cost_score",
        "cost_train", "cost_units"]).to_pylist()
    assert {r["cost_units"] for r in rows} == {
        "generate=CPU,annotate=CPU,check=CPU,score=CPU,train=CPU"}
    assert all(r["cost_generate"] > 0 and r["cost_annotate"] > 0 and r["cost_check"] > 0
               for r in rows)
    pasted = [r for r in rows if r["decision"] != "invalid"]
    assert pasted and all(r["cost_train"] > 0 for r in pasted)
    assert any(r["cost_score"] > 0 for r in pasted)
    summary = json.loads((demo_run / "summary.json").read_text())
    cost = summary["cost"]
    accepted = sum(r["decision"] == "accepted" for r in rows)
    spent = sum(r[f"cost_{s}"] for r in rows for s in
                ("generate", "annotate", "check", "score", "train"))
    assert cost["all"]["per_accepted"] == pytest.approx(spent / accepted)
    code, text = invoke_cli("inspect", str(demo_run), "--table", "cost_classes")
    assert code == 0 and "Cost per accepted instance by class" in text, text


def _rescore(run: Path, checkpoint: str, out: Path) -> dict:
    code, text = invoke_cli("rescore", str(run), "--checkpoint", checkpoint, "--out", str(out))
    assert code == 0, text
    assert "rescored" in text and "--compare" in text
    return json.loads((out / "rescore.json").read_text())


def test_two_checkpoints_judge_the_stored_candidates_apart(demo_run: Path,
                                                           tmp_path: Path) -> None:
    checkpoints = RunDir(str(demo_run)).list_checkpoints()
    assert len(checkpoints) >= 2, checkpoints
    (early_step, early), (late_step, late) = checkpoints[0], checkpoints[-1]
    source = read_decisions(str(demo_run), columns=COLUMNS).to_pylist()
    stored = {r["sample_id"]: r for r in source if r["decision"] != "invalid"}
    judged = {}
    for name, ckpt, step in (("early", early, early_step), ("late", late, late_step)):
        info = _rescore(demo_run, str(demo_run / ckpt), tmp_path / name)
        assert info["step"] == step and info["candidates"] == len(stored)
        assert sum(info["counts"].values()) == len(stored)
        rows = read_decisions(str(tmp_path / name), columns=COLUMNS).to_pylist()
        # every stored candidate exactly once, under its own id, judged by that checkpoint
        assert sorted(r["sample_id"] for r in rows) == sorted(stored)
        assert {r["judged_by"] for r in rows} == {info["judged_by"]}
        assert ckpt in info["judged_by"] and {r["step"] for r in rows} == {step}
        assert all(r["source_id"] == r["sample_id"] and r["image_png"] for r in rows)
        assert all(r["class_id"] == stored[r["sample_id"]]["class_id"] for r in rows)
        # a rescoring costs reading, checking and scoring, and no training
        costs = read_decisions(str(tmp_path / name),
                               columns=["cost_score", "cost_train"]).to_pylist()
        assert all(c["cost_train"] == 0 for c in costs) and any(c["cost_score"] > 0
                                                                for c in costs)
        assert sorted(r["stream_offset"] for r in rows) == list(range(len(stored)))
        judged[name] = {r["sample_id"]: r for r in rows}
    # rescoring trains nothing: the run's checkpoints are as they were
    assert RunDir(str(demo_run)).list_checkpoints() == checkpoints
    flips = [s for s in stored if judged["early"][s]["accepted"] != judged["late"][s]["accepted"]]
    assert flips, "two checkpoints 8 steps apart judged every candidate alike"
    up = [s for s in flips if judged["early"][s]["decision"] == "rejected"
          and judged["late"][s]["decision"] == "accepted"]
    code, text = invoke_cli("inspect", str(tmp_path / "late"), "--compare",
                            str(tmp_path / "early"), "--json")
    assert code == 0, text
    doc = json.loads(text)
    transitions = {(r["before"], r["after"]): r["n"]
                   for r in doc["tables"]["transitions"]["rows"]}
    # A = late (after), B = early (before --compare): early's rejections late accepts
    assert transitions.get(("rejected", "accepted"), 0) == len(up)
    assert transitions.get(("accepted", "rejected"), 0) == sum(
        1 for s in stored if judged["early"][s]["decision"] == "accepted"
        and judged["late"][s]["decision"] == "rejected")
    assert sum(r["rejected_to_accepted"] for r in doc["tables"]["flips"]["rows"]) == len(up)
    by_class = {r["class_id"]: r for r in doc["tables"]["flips"]["rows"]}
    assert sum(r["accepted_to_rejected"] + r["rejected_to_accepted"]
               for r in by_class.values()) == len(flips)
    judges = {r["side"]: r["judged_by"] for r in doc["tables"]["judges"]["rows"]}
    assert late in judges["A"] and early in judges["B"]
    # the run itself against a rescoring: the run's own trainer on one side
    code, text = invoke_cli("inspect", str(demo_run), "--compare", str(tmp_path / "late"))
    assert code == 0 and "the run's trainer" in text and "Flips by class" in text, text


def test_a_batch_level_run_or_a_missing_checkpoint_is_refused(demo_run: Path,
                                                              tmp_path: Path) -> None:
    code, text = invoke_cli("rescore", str(demo_run), "--checkpoint",
                            str(demo_run / "checkpoints" / "step-000000999.pt"),
                            "--out", str(tmp_path / "x"))
    assert code != 0 and "no such file" in text
    code, text = invoke_cli("rescore", str(demo_run), "--checkpoint", str(demo_run),
                            "--out", str(tmp_path / "y"), "selection.keep_fraction=0.2")
    assert code != 0 and "selection.keep_fraction" in text

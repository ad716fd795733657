"""`bsgal plan`: generation and annotation devices that keep N trainers busy, from recorded
costs (a run's shards, a gpu_check results file), checked against answers worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.inspection.capacity_plan import (
    PlanError,
    StageCosts,
    cluster_overrides,
    costs_from_gpu_check,
    make_plan,
    run_overrides,
)
from tests.conftest import invoke_cli, make_rows, write_run

GPU_UNITS = "generate=GPU,annotate=GPU,check=CPU,score=GPU,train=GPU"


def test_a_plan_worked_by_hand() -> None:
    # Per candidate: generate 0.5 GPU-s, annotate 0.1 GPU-s, checks 0.02 CPU-s, trainer
    # 0.05 + 0.15 = 0.2 GPU-s. Four trainers decide 4 / 0.2 = 20 candidates/s, which takes
    # 20 x 0.5 = 10 generation GPUs, 20 x 0.1 = 2 annotation GPUs and 0.4 CPUs of checks (one
    # actor); an accepted instance costs 0.82 / 0.5 = 1.64 device-s.
    costs = StageCosts({"generate": 0.5, "annotate": 0.1, "check": 0.02, "score": 0.05,
                        "train": 0.15},
                       {"generate": "GPU", "annotate": "GPU", "check": "CPU", "score": "GPU",
                        "train": "GPU"}, accept_rate=0.5, source="hand")
    plan = make_plan(costs, 4)
    assert plan.candidates_per_s == pytest.approx(20.0)
    assert plan.devices == pytest.approx({"generate": 10.0, "annotate": 2.0, "check": 0.4})
    assert plan.rounded == {"generate": 10, "annotate": 2, "check": 1}
    assert plan.cost_per_accepted == pytest.approx(1.64)
    assert plan.nodes == {"gen-gpu": 10, "ann-gpu": 2, "train-gpu": 1}
    assert run_overrides(plan) == [
        "generation.concurrency=10", "generation.num_gpus=1", "annotation.concurrency=2",
        "annotation.num_gpus=1", "annotation.check_concurrency=1",
        "annotation.check_num_gpus=0", "annotation.check_num_cpus=1",
        "training.num_workers=4", "training.use_gpu=true"]
    # Six trainers: 30/s, 15 and 3 GPUs, two train nodes of four GPUs.
    six = make_plan(costs, 6)
    assert six.rounded == {"generate": 15, "annotate": 3, "check": 1}
    assert cluster_overrides(six) == {"max_workers": 20, "available_node_types": {
        "gen-gpu": {"min_workers": 15, "max_workers": 15},
        "ann-gpu": {"min_workers": 3, "max_workers": 3},
        "train-gpu": {"min_workers": 2, "max_workers": 2}}}


def test_a_gpu_check_file_gives_the_stage_rates() -> None:
    # Best generation batch 3.2 images/s: 0.3125 GPU-s each; SAM 10 images/s: 0.1; the
    # default step 400 ms for 8 candidates: 0.05. Two trainers: 40/s, 12.5 -> 13 generation
    # GPUs, 4 annotation GPUs; (0.3125 + 0.1 + 0.05) / 0.7 per accepted instance.
    doc = {"device": "NVIDIA H100", "smoke": False,
           "generation": {"rows": [{"batch": 1, "images_per_s": 1.0},
                                   {"batch": 8, "images_per_s": 3.2}]},
           "annotation": {"images_per_s": 10.0},
           "training": {"rows": [{"method": "plain", "ms_per_step": 300.0},
                                 {"method": "default", "ms_per_step": 400.0}]}}
    plan = make_plan(costs_from_gpu_check(doc, "gpu_check.json", 0.7), 2)
    assert plan.candidates_per_s == pytest.approx(40.0)
    assert plan.devices["generate"] == pytest.approx(12.5)
    assert plan.rounded == {"generate": 13, "annotate": 4, "check": 1}
    assert plan.cost_per_accepted == pytest.approx((0.3125 + 0.1 + 0.05) / 0.7)
    assert any("acceptance rate 70%" in a for a in plan.costs.assumed)
    with pytest.raises(PlanError, match="not a gpu_check results file"):
        costs_from_gpu_check({"generation": {"rows": []}}, "x.json", 0.7)


def test_plan_from_a_runs_shards_on_the_command_line(tmp_path: Path) -> None:
    rows = make_rows()
    for r in rows:
        r["cost_units"] = GPU_UNITS
    write_run(str(tmp_path / "run"), rows)
    n = len(rows)
    scored = sum(not r["reason"].startswith("invalid") for r in rows)
    accepted = sum(r["reason"] == "accepted" for r in rows)
    trainer = (0.1 + 0.3) * scored / n        # GPU-s per candidate (invalid rows cost 0)
    demand = 3 / trainer                      # three trainers
    out = tmp_path / "plan.yaml"
    code, text = invoke_cli("plan", str(tmp_path / "run"), "--train-gpus", "3",
                            "--write-overrides", str(out))
    assert code == 0, text
    assert f"decide {demand:.3g} candidates/s" in text, text
    assert f"generate  {demand * 0.5:.3g} GPUs" in text and f"annotate  {demand * 0.2:.3g} GPUs" \
        in text, text
    per_accepted = (0.5 + 0.2 + 0.05 + trainer) / (accepted / n)
    assert f"cost per accepted instance: {per_accepted:.3g}" in text, text
    written = yaml.safe_load(out.read_text())
    assert f"generation.concurrency={-int(-demand * 0.5 // 1)}" in written["run_overrides"]
    assert written["cluster"]["available_node_types"]["train-gpu"]["max_workers"] == 1


def test_plan_refuses_what_gives_no_plan(tmp_path: Path) -> None:
    bad = tmp_path / "gpu_check.json"
    bad.write_text("{not json")
    code, text = invoke_cli("plan", str(bad))
    assert code == 1 and "cannot be read as JSON" in text and "Traceback" not in text, text
    bad.write_text(json.dumps({"device": "x"}))
    code, text = invoke_cli("plan", str(bad))
    assert code == 1 and "gpu_check results file" in text, text
    costs = StageCosts({"generate": 0.1, "score": 0.0, "train": 0.0}, {}, None, "a run")
    with pytest.raises(PlanError, match="no trainer time recorded"):
        make_plan(costs, 1)
    code, text = invoke_cli("plan", str(tmp_path / "nothing-here"))
    assert code == 1 and "nothing-here" in text, text

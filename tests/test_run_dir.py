"""Run folder: checkpoints (weights_only), metrics log, small files; local and S3."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.storage.run_dir import MetricsLog, RunDir, read_metrics


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(3, 4)}, "rng": torch.get_rng_state(),
            "offsets": [step * 8], "name": "run", "lr": 0.001}


def _check_checkpoints(run: RunDir) -> None:
    for step in (10, 20, 30, 40):
        run.save_checkpoint(step, _state(step), keep=2)
    assert [s for s, _ in run.list_checkpoints()] == [30, 40]
    latest = run.latest_checkpoint()
    assert latest == "checkpoints/step-000000040.pt"
    loaded = run.load_checkpoint(latest)
    expected = _state(40)
    assert loaded["step"] == 40 and loaded["offsets"] == [320] and loaded["name"] == "run"
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["rng"], expected["rng"])


def test_checkpoints_local(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "out"))
    assert run.latest_checkpoint() is None
    _check_checkpoints(run)
    assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if ".tmp-" in p.name]


class NotAllowed:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoint_loading_refuses_arbitrary_objects(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    buf = io.BytesIO()
    torch.save({"evil": NotAllowed()}, buf)
    run.write_bytes("checkpoints/step-000000001.pt", buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        run.load_checkpoint("checkpoints/step-000000001.pt")


def test_metrics_and_json_local(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    log = MetricsLog(run)
    log.log("train", step=1, loss=1.5, nan_value=float("nan"))
    log.log("train", step=2, loss=torch.tensor(1.25).numpy())
    log.close()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["nan_value"] is None and records[1]["loss"] == 1.25
    run.write_json("eval.json", {"segm": {"AP": 0.5}})
    assert run.read_json("eval.json") == {"segm": {"AP": 0.5}}


@pytest.mark.s3
def test_checkpoints_and_metrics_on_s3(s3_server) -> None:
    bucket = s3_server.make_bucket("rundir-test")
    run = RunDir(f"{bucket}/runs/x", s3_server.storage_options)
    _check_checkpoints(run)
    log = MetricsLog(run, upload_seconds=3600)
    for step in range(5):
        log.log("train", step=step, loss=1.0 / (step + 1))
    assert read_metrics(run) == [] or len(read_metrics(run)) <= 1  # uploads are batched
    log.close()
    assert [r["step"] for r in read_metrics(run)] == list(range(5))
    # A new log on the same run continues the file instead of overwriting it.
    again = MetricsLog(RunDir(f"{bucket}/runs/x", s3_server.storage_options))
    again.log("eval", step=5, ap=0.1)
    again.close()
    assert [r["kind"] for r in read_metrics(run)] == ["train"] * 5 + ["eval"]

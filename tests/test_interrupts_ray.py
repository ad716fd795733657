"""Interrupts on a real local Ray, with `bsgal run` as its own process: Ctrl-C stops the stream,
writes a checkpoint and the pending rows and says how to resume; the resumed run finishes with
every candidate decided once. (SIGTERM, which takes the same handler, and the second Ctrl-C are
tested without Ray in tests/test_first_run.py; a Ctrl-C resumed to the same decisions as an
uninterrupted run is one of benchmarks/faults.py's kinds.) The data holds truncated images,
which ``data.bad_images=skip`` leaves out and the summary names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from pipeline.storage.run_dir import RunDir, read_metrics  # noqa: E402
from pipeline.storage.shards import read_decisions  # noqa: E402
from tests.conftest import DEMO_CONFIG, REPO_ROOT  # noqa: E402

CANDIDATES = 48


def _overrides(data: Path, out: Path) -> list[str]:
    keys = {"data.root": data, "data.max_val_images": 6, "data.bad_images": "skip",
            "generation.num_candidates": CANDIDATES, "generation.batch_size": 16,
            "annotation.batch_size": 16, "annotation.check_batch_size": 8,
            "training.steps": 16, "training.warmup_real_steps": 2, "training.warmup_steps": 2,
            "training.checkpoint_every": 0, "training.candidate_batch_size": 8,
            "output.shard_max_rows": 1000, "output.shard_flush_seconds": 600,
            "output.dir": out}
    return [f"{k}={v}" for k, v in keys.items()]


def _bsgal(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO_ROOT)}
    # A session of its own: a failed test kills the driver and the local Ray it started.
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        records = read_metrics(RunDir(str(out))) if (out / "metrics.jsonl").exists() else []
        if any(r.get("kind") == "step" and r["step"] >= step for r in records[1:]):
            return
        time.sleep(0.3)
    _kill(proc)
    raise AssertionError(f"no step {step} within {timeout} s")


def _rows(out: Path) -> list[str]:
    return read_decisions(str(out), columns=["sample_id"]).column("sample_id").to_pylist()


def test_interrupts_checkpoint_and_resume_to_every_candidate_once(
        builtin_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(builtin_data, data)
    train = sorted(json.loads((data / "train.json").read_text())["images"],
                   key=lambda im: im["id"])
    val = sorted(json.loads((data / "val.json").read_text())["images"], key=lambda im: im["id"])
    bad = [im["file_name"] for im in train[::3]] + [val[3]["file_name"]]
    for name in bad:
        path = data / "images" / name
        path.write_bytes(path.read_bytes()[:60])
    out = tmp_path / "run"

    # 1. Ctrl-C mid-run: checkpoint at the interrupt (checkpoint_every=0) and every row.
    proc = _bsgal("run", "--config", str(DEMO_CONFIG), "--progress", "off",
                  *_overrides(data, out))
    _wait_for_step(proc, out, 4)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, output
    run = RunDir(str(out))
    name = run.latest_checkpoint()
    assert name is not None, output
    info = run.read_json(name.replace(".pt", ".json"))
    step = info["step"]
    assert f"interrupted at step {step} (SIGINT); resume with bsgal run --resume {out}" \
        in output
    ids = _rows(out)
    assert 0 < len(ids) == info["ranks"][0]["stream_offset"] < CANDIDATES  # none pending
    assert not (out / "eval.json").exists()

    # 2. Resume to the end: every candidate decided exactly once; the bad images named.
    proc = _bsgal("run", "--resume", str(out), "--progress", "off")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    ids = _rows(out)
    assert len(ids) == len(set(ids)) == CANDIDATES
    summary = run.read_json("summary.json")
    assert summary["counts_add_up"]
    skipped = summary["skipped_images"]
    assert any(val[3]["file_name"] in uri for uri in skipped), skipped
    assert len(skipped) >= 2 and all(any(b in uri for b in bad) for uri in skipped)
    assert "images that do not load (data.bad_images=skip" in output

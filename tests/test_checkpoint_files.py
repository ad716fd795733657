"""Checkpoint files that are not what they should be: a truncated latest checkpoint is set aside
and the run resumes from the newest readable one, with a warning naming it; a file that is not
a bsgal checkpoint is refused in one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.run.job import plan_resume
from pipeline.run.rescore import locate_checkpoint
from pipeline.storage.checkpoints import (
    checkpoint_problem,
    newest_readable_checkpoint,
    save_main,
)
from pipeline.storage.run_dir import RunDir
from tests.conftest import CONFIGS


def _two_checkpoints(out: Path) -> RunDir:
    run = RunDir(str(out))
    for step in (4, 8):
        save_main(run, step, {"model": {"w": torch.full((64, 64), float(step))}},
                  [{"stream_offset": 0}], "hash", keep=3)
    return run


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_one_before_resumed(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = _two_checkpoints(out)
    latest = out / "checkpoints" / "step-000000008.pt"
    assert checkpoint_problem(run, "checkpoints/step-000000008.pt") is None
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    assert "truncated" in checkpoint_problem(run, "checkpoints/step-000000008.pt")

    cfg = load_config(CONFIGS / "demo.yaml", [f"output.dir={out}"])
    point = plan_resume(cfg, sampler=None)
    assert point.checkpoint == "checkpoints/step-000000004.pt" and point.step == 4
    assert len(point.set_aside) == 1 and str(latest) in point.set_aside[0]
    assert "step-000000008.pt.unreadable" in point.set_aside[0]
    assert (out / "checkpoints" / "step-000000008.pt.unreadable").exists()
    assert [n for _, n in run.list_checkpoints()] == ["checkpoints/step-000000004.pt"]
    assert newest_readable_checkpoint(run) == ("checkpoints/step-000000004.pt", [])

    # none readable: nothing to resume from, and each one named
    first = out / "checkpoints" / "step-000000004.pt"
    first.write_bytes(b"not a zip")
    name, aside = newest_readable_checkpoint(run)
    assert name is None and len(aside) == 1 and str(first) in aside[0]


def test_a_file_that_is_not_a_bsgal_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _two_checkpoints(out)
    folder = out / "checkpoints"
    torch.save({"conv.weight": torch.zeros(3)}, folder / "resnet.pt")
    with pytest.raises(UserError, match="not a bsgal checkpoint name") as err:
        locate_checkpoint(str(folder / "resnet.pt"), {})
    assert "\n" not in str(err.value)
    # a foreign .pt under a checkpoint's name: no JSON beside it
    torch.save({"conv.weight": torch.zeros(3)}, folder / "step-000000012.pt")
    with pytest.raises(UserError, match="step-000000012.pt cannot be used") as err:
        locate_checkpoint(str(folder / "step-000000012.pt"), {})
    assert "\n" not in str(err.value) and "step-NNNNNNNNN.json" in str(err.value)
    # a truncated one, found through the run folder
    (folder / "step-000000012.pt").unlink()
    latest = folder / "step-000000008.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        locate_checkpoint(str(out), {})
    assert locate_checkpoint(str(folder / "step-000000004.pt"), {})[1] == \
        "checkpoints/step-000000004.pt"

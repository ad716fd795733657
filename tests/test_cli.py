"""The bsgal command line: help for every command, and synth + evaluate from the shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import REPO_ROOT



def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, prefix + (name,))


def test_console_script_points_at_cli() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("bsgal") == "pipeline.cli:main"


def test_top_level_help_lists_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in main.commands:
        assert name in result.output


@pytest.mark.parametrize("path", list(_all_commands(main)), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: main " + " ".join(path) in result.output or "Usage: " in result.output
    # Every command explains itself in at least one sentence.
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    assert cmd.help and len(cmd.help.split()) >= 4


def _bsgal(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_synth_then_evaluate_from_the_shell(tmp_path: Path) -> None:
    out = tmp_path / "set"
    done = _bsgal("data", "synth", str(out), "--seed", "1", "--train-images", "200",
                  "--val-images", "12", "--image-size", "96", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "classes: 4 frequent, 4 common, 4 rare" in done.stdout
    gt = json.loads((out / "val.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9, "segmentation": a["segmentation"]} for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    done = _bsgal("evaluate", str(out / "val.json"), str(tmp_path / "dets.json"), "--json",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["APr"] == pytest.approx(1.0)
    table = _bsgal("evaluate", str(out / "val.json"), str(tmp_path / "dets.json"), cwd=tmp_path)
    assert table.returncode == 0 and "APr" in table.stdout and "100.0" in table.stdout


def test_errors_are_one_line_with_nonzero_exit(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["config", "show", "training.stpes=3"])
    assert result.exit_code == 1
    assert "did you mean 'training.steps'?" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["evaluate", str(tmp_path / "gt.json"), str(tmp_path / "d.json")])
    assert result.exit_code == 1 and "gt.json: file not found" in result.output
    (tmp_path / "gt.json").write_text('{"images": [], "annotations": [], "categories": [{"id": 1}]}')
    result = runner.invoke(main, ["evaluate", str(tmp_path / "gt.json"), str(tmp_path / "d.json")])
    assert result.exit_code == 1 and "category id=1 has no field 'name'" in result.output

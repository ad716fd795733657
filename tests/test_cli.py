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
from tests.conftest import REPO_ROOT, invoke_cli



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
    # 200 images: the planned frequent classes are in at most 100 each, so LVIS calls them
    # common; the summary counts the labels the file holds.
    cats = json.loads((out / "train.json").read_text())["categories"]
    groups = {g: sum(c["frequency"] == g for c in cats) for g in "fcr"}
    assert groups == {"f": 0, "c": 8, "r": 4}
    assert "classes: 0 frequent, 8 common, 4 rare" in done.stdout
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


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_synth_refuses_a_non_empty_folder_and_force_replaces_only_its_files(
        tmp_path: Path) -> None:
    out = tmp_path / "set"
    args = ("data", "synth", str(out), "--train-images", "188", "--image-size", "48")
    code, text = invoke_cli(*args, "--val-images", "3")
    assert code == 0, text
    (out / "notes.txt").write_text("mine")
    (out / "images" / "train" / "cover.png").write_bytes(b"mine too")
    before = _files(out)
    code, text = invoke_cli(*args, "--val-images", "2", "--seed", "5")
    assert code == 1 and len(text.strip().splitlines()) == 1
    assert "is not empty" in text and "--force" in text
    assert _files(out) == before  # nothing was touched
    code, text = invoke_cli(*args, "--val-images", "2", "--seed", "5", "--force")
    assert code == 0, text
    assert f"removed {188 + 3 + 2} files" in text
    after = _files(out)
    assert after["notes.txt"] == b"mine" and after["images/train/cover.png"] == b"mine too"
    assert sorted(after) == sorted(["notes.txt", "images/train/cover.png", "train.json",
                                    "val.json", "images/val/000000.png", "images/val/000001.png"]
                                   + [f"images/train/{i:06d}.png" for i in range(188)])
    assert json.loads(after["val.json"])["info"]["seed"] == 5
    code, text = invoke_cli("data", "synth", "--help")
    assert "--force" in text and "nothing else" in text


@pytest.mark.parametrize("args, option, value", [
    (("--train-images", "50"), "--train-images", "50 is below the minimum 188"),
    (("--train-images", "-5"), "--train-images", "-5 is below the minimum 188"),
    (("--classes", "3", "--train-images", "46"), "--train-images", "46 is below the minimum 47"),
    (("--val-images", "0"), "--val-images", "0 is below the minimum 1"),
    (("--classes", "2"), "--classes", "2 is below the minimum 3"),
])
def test_synth_sizes_name_the_option_and_minimum(tmp_path: Path, args: tuple, option: str,
                                                 value: str) -> None:
    code, text = invoke_cli("data", "synth", str(tmp_path / "set"), *args)
    assert code == 2 and f"Invalid value for {option}: {value}" in text
    assert not (tmp_path / "set").exists()


def test_evaluate_box_only_and_malformed_detections(builtin_data: Path, tmp_path: Path) -> None:
    gt = builtin_data / "val.json"
    anns = json.loads(gt.read_text())["annotations"]
    dets = tmp_path / "boxes.json"
    dets.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"],
                                 "bbox": a["bbox"], "score": 0.9} for a in anns]))
    code, text = invoke_cli("evaluate", str(gt), str(dets))
    assert code == 0, text
    assert (f"note: segm not evaluated: {len(anns)} of {len(anns)} detections have no "
            "'segmentation' (box-only results)") in text
    rows = [ln.split()[0] for ln in text.splitlines() if ln.split()[:1] in (["bbox"], ["segm"])]
    assert rows == ["bbox"] and "100.0" in text
    code, text = invoke_cli("evaluate", str(gt), str(dets), "--iou-type", "segm")
    assert code == 1 and len(text.strip().splitlines()) == 1
    assert "needs a 'segmentation'" in text and "evaluated on bbox only" in text
    (tmp_path / "object.json").write_text(json.dumps({"annotations": anns[:2]}))
    code, text = invoke_cli("evaluate", str(gt), str(tmp_path / "object.json"))
    assert code == 1 and f"{tmp_path / 'object.json'}: the file must hold a JSON list of " \
        "detections" in text and "no field" not in text


"""From a first run to a real run without trial and error (no Ray started here): output that
cannot scatter, a failed start that does not block its retry, one up-front check that lists
every problem, an address that does not answer, bad images, small config mistakes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.run import job
from pipeline.run.job import TrainingFailed, run_job
from pipeline.storage.run_dir import RunExistsError
from pipeline.run.preflight import PreflightError, preflight, probe_ray_address, ray_host_port
from pipeline.storage.run_config import resume_config, write_run_config
from pipeline.storage.run_dir import RunDir
from tests.conftest import CONFIGS, DEMO_CONFIG, free_port

LVIS_CONFIG = CONFIGS / "lvis_sd_sam.yaml"


# ------------------------------------------------------------------------- 1. output.dir


@pytest.mark.parametrize("value, words", [("", "empty"), ("'  '", "empty"),
                                          ("/", "filesystem root"), ("s3://", "names no bucket"),
                                          ("s3:///", "names no bucket")])
def test_empty_or_root_output_is_refused(value: str, words: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=f"output.dir: .*{words}"):
        load_config(DEMO_CONFIG, [f"output.dir={value}"])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--config", str(DEMO_CONFIG), f"output.dir={value}",
                                       "training.steps=400"])
    assert result.exit_code == 1 and "output.dir" in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # nothing scattered into the current folder


# ------------------------------------------------------------- 2. a failed start, retried


def _fail_on_ray(*args: object, **kwargs: object) -> dict:
    raise TrainingFailed("training failed: RuntimeError: no GPU (injected)")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        out, opts = f"{s3.make_bucket('bsgal-retry')}/run", dict(s3.storage_options)
    else:
        out, opts = str(tmp_path / "run"), {}
    cfg = load_config(DEMO_CONFIG, [f"output.dir={out}", f"data.root={tmp_path / 'data'}",
                                    f"output.storage_options={json.dumps(opts)}"])
    monkeypatch.setattr(job, "_run_on_ray", _fail_on_ray)
    messages: list[str] = []
    for _ in range(2):  # the same command again fails the same way, not with "holds a run"
        with pytest.raises(TrainingFailed, match="no GPU"):
            run_job(cfg, progress="off", echo=messages.append)
        run = RunDir(out, opts)
        run.fs.invalidate_cache()
        assert not run.exists("config.yaml") and not run.exists("metrics.jsonl")
    assert any("nothing of it was kept" in m for m in messages), messages
    if where == "local":  # not even the empty folder
        assert not Path(out).exists()


def test_a_check_leaves_no_folder_behind(tmp_path: Path) -> None:
    from pipeline.storage.shard_writer import preflight_writable

    out = tmp_path / "new" / "deeper" / "run"
    preflight_writable(str(out))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    preflight_writable(str(tmp_path / "kept"))  # a folder that was there stays
    assert (tmp_path / "kept").is_dir()


def test_a_killed_start_is_named_and_resume_may_fix_any_key(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(DEMO_CONFIG, [f"output.dir={out}"])
    run = RunDir(str(out))
    write_run_config(run, cfg)  # what a driver killed before its first checkpoint leaves
    with pytest.raises(RunExistsError, match="stopped before its first checkpoint.*--resume"):
        run_job(cfg, progress="off")
    fixed = resume_config(str(out), ["training.steps=7", "training.warmup_real_steps=0",
                                         "generation.num_candidates=16"])
    assert fixed.training.steps == 7 and fixed.generation.num_candidates == 16
    run.write_bytes("checkpoints/step-000000004.pt", b"x")  # once a checkpoint exists ...
    with pytest.raises(ConfigError, match="training.steps cannot change here"):
        resume_config(str(out), ["training.steps=400"])


# --------------------------------------------------- 3. one up-front check, every problem


def _lvis_folder(root: Path, builtin_data: Path) -> Path:
    """An LVIS-format folder laid out as configs/lvis_sd_sam.yaml expects."""
    root.mkdir(parents=True)
    shutil.copy(builtin_data / "train.json", root / "lvis_v1_train.json")
    shutil.copy(builtin_data / "val.json", root / "lvis_v1_val.json")
    shutil.copytree(builtin_data / "images", root / "coco")
    return root


def test_check_lists_every_problem_at_once_and_run_refuses_before_writing(
        tmp_path: Path, builtin_data: Path) -> None:
    corrupt_sam = tmp_path / "sam_vit_h.pth"
    corrupt_sam.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    sd_folder = tmp_path / "sd"  # a folder without model_index.json
    sd_folder.mkdir()
    out = tmp_path / "out"
    args = [f"output.dir={out}", f"data.root={tmp_path / 'no-such-lvis'}",
            f"annotation.sam_checkpoint={corrupt_sam}", f"generation.model={sd_folder}",
            f"ray.address=127.0.0.1:{free_port()}"]
    started = time.monotonic()
    result = CliRunner().invoke(main, ["check", "--config", str(LVIS_CONFIG), *args])
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    problems = [ln for ln in result.output.splitlines() if ln.startswith("PROBLEM")]
    assert len(problems) == 4, result.output
    for key in ("ray.address", "generation.model", "annotation.sam_checkpoint", "data.root"):
        assert any(key in p for p in problems), (key, problems)
    assert "nothing answers" in result.output and "cannot be opened" in result.output
    assert "ok       output" in result.output

    cfg = load_config(LVIS_CONFIG, args)
    with pytest.raises(PreflightError, match="4 problems found before starting") as info:
        run_job(cfg, progress="off")
    assert len(info.value.problems) == 4
    assert not (out / "config.yaml").exists()


def test_check_passes_when_weights_and_data_are_there(tmp_path: Path,
                                                      builtin_data: Path) -> None:
    sam = tmp_path / "sam.pth"
    torch.save({"image_encoder.weight": torch.zeros(2, 2)}, sam)
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    data = _lvis_folder(tmp_path / "lvis", builtin_data)
    cfg = load_config(LVIS_CONFIG, [f"output.dir={tmp_path / 'out'}", f"data.root={data}",
                                    f"annotation.sam_checkpoint={sam}", f"generation.model={sd}",
                                    "generation.concurrency=1", "annotation.concurrency=1",
                                    "generation.num_gpus=0", "annotation.num_gpus=0",
                                    "annotation.check_num_gpus=0", "training.use_gpu=false",
                                    "ray.num_cpus=64"])
    report = preflight(cfg)
    assert report.problems == [], report.problems
    passed = " | ".join(report.passed)
    assert "SAM checkpoint" in passed and "model_index.json" in passed
    assert "all 60 validation images decode" in passed


def test_ray_addresses_are_read_and_probed() -> None:
    assert ray_host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert ray_host_port("ray://head:10001") == ("head", 10001)
    assert ray_host_port("auto") is None
    started = time.monotonic()
    assert "nothing answers at 127.0.0.1" in probe_ray_address(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 5


# ------------------------------------------------------------- 4. no hang on a dead address


def test_run_with_an_address_that_does_not_answer_fails_in_seconds(tmp_path: Path,
                                                                   ray_starts: list) -> None:
    out = tmp_path / "raybad"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["run", "--config", str(DEMO_CONFIG),
                                       f"ray.address=127.0.0.1:{free_port()}",
                                       f"output.dir={out}", f"data.root={tmp_path / 'data'}"])
    assert time.monotonic() - started < 15
    assert result.exit_code == 1 and "nothing answers" in result.output, result.output
    assert not (out / "config.yaml").exists() and ray_starts == []


# -------------------------------------------------------------------------- 5. bad images


def _with_bad_images(tmp_path: Path, builtin_data: Path) -> tuple[Path, str, str]:
    root = tmp_path / "data"
    shutil.copytree(builtin_data, root)
    train = json.loads((root / "train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    first_train = sorted(train["images"], key=lambda im: im["id"])[0]["file_name"]
    a_val = sorted(val["images"], key=lambda im: im["id"])[3]["file_name"]
    for name in (first_train, a_val):
        path = root / "images" / name
        path.write_bytes(path.read_bytes()[:60])  # truncated PNG
    return root, first_train, a_val


def test_bad_images_are_found_before_training_and_follow_the_policy(
        tmp_path: Path, builtin_data: Path) -> None:
    root, bad_train, bad_val = _with_bad_images(tmp_path, builtin_data)
    base = [f"data.root={root}", f"output.dir={tmp_path / 'out'}"]
    report = preflight(load_config(DEMO_CONFIG, [*base, "data.bad_images=error"]))
    text = " ".join(p.line() for p in report.problems)
    assert len(report.problems) == 2 and bad_train in text and bad_val in text
    assert "data.bad_images=skip" in text
    report = preflight(load_config(DEMO_CONFIG, [*base, "data.bad_images=skip"]))
    assert report.problems == [] and len(report.warnings) == 2


def test_skip_leaves_bad_images_out_of_training_and_evaluation(
        tmp_path: Path, builtin_data: Path) -> None:
    from trainer.datasets import LvisDataset
    from trainer.datasets.lvis_format import DatasetFormatError
    from trainer.factory import build_trainer
    from trainer.real_data import RealImages

    root, bad_train, bad_val = _with_bad_images(tmp_path, builtin_data)
    strict = RealImages(LvisDataset(root, "train.json"))
    with pytest.raises(DatasetFormatError, match="does not decode"):
        strict[0]
    train = LvisDataset(root, "train.json", bad_images="skip")
    real = RealImages(train)
    assert real[0]["image_id"] == train.images[1]["id"]  # the next image stands in
    assert list(train.skipped) == [train.image_uri(0)] and bad_train in train.image_uri(0)
    val = LvisDataset(root, "val.json", bad_images="skip", max_images=6)
    trainer = build_trainer(train, val, training={"arch": "small", "steps": 1},
                            selection={"method": "accept_all"})
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["segm"]["AP"]) and list(val.skipped) == [val.image_uri(3)]
    with pytest.raises(DatasetFormatError, match=bad_val):
        build_trainer(train, LvisDataset(root, "val.json", max_images=6),
                      training={"arch": "small", "steps": 1},
                      selection={"method": "accept_all"}).evaluate()


# --------------------------------------------------------------------- 10. small mistakes


def test_small_config_mistakes_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="selection.fixed_threshold: must be a finite number"):
        load_config(DEMO_CONFIG, ["selection.fixed_threshold=.nan"])
    with pytest.raises(ConfigError, match="training.warmup_real_steps: 50 real-only steps "
                                          "exceed training.steps \\(40\\)"):
        load_config(DEMO_CONFIG, ["training.steps=40", "training.warmup_real_steps=50"])
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing here\n")
    for path, words in ((binary, "is not a text \\(UTF-8\\) YAML file"), (empty, "is empty")):
        with pytest.raises(ConfigError, match=words):
            load_config(path)
        result = CliRunner().invoke(main, ["config", "show", "--config", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output


def test_progress_lines_give_an_eta_from_the_rates_seen() -> None:
    import io

    from pipeline.run.progress import ProgressDisplay, TrainerTotals, format_seconds

    display = ProgressDisplay(board=None, candidates=100, steps=50, mode="lines",
                              stream=io.StringIO())
    assert display.eta(10.0, TrainerTotals(step=5, decided=10)) is None  # first report
    # 10 steps in 20 s → 35 steps left ≈ 70 s; 30 candidates in 20 s → 60 left ≈ 40 s.
    assert display.eta(30.0, TrainerTotals(step=15, decided=40)) == pytest.approx(70.0)
    # The candidates are the longer part once the steps are nearly done.
    assert display.eta(50.0, TrainerTotals(step=48, decided=50)) == pytest.approx(
        50 * 40 / 40)
    display._print_line({"stages": {}, "ranks": {0: {"step": 48, "decided": 50}},
                         "elapsed": 50.0}, final=False)
    assert "ETA 50 s" in display.stream.getvalue()
    assert [format_seconds(s) for s in (42, 185, 7620)] == ["42 s", "3 min 05 s", "2 h 07 min"]


def test_worker_warnings_are_kept_once_bounded_and_printed_once(
        capsys: pytest.CaptureFixture) -> None:
    from pipeline.run.progress import MAX_NOTICES, NoticePrinter, ProgressBoard

    board = ProgressBoard()
    for _ in range(3):
        board.notice("warning (generate stage): feedback: the demand actor is gone")
    for i in range(2 * MAX_NOTICES):  # a warning in a loop with a changing text
        board.notice(f"warning (check stage): batch {i}")
    notices = board.snapshot()["notices"]
    assert len(notices) == MAX_NOTICES and notices[0].startswith("warning (generate stage)")
    printer = NoticePrinter(board=None)
    printer.show(notices[:2])
    printer.show(notices[:3])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"bsgal {t}" for t in notices[:3]]


def test_the_eta_restarts_when_the_trainer_changes_phase() -> None:
    import io

    from pipeline.run.progress import ProgressDisplay, TrainerTotals

    display = ProgressDisplay(board=None, candidates=100, steps=100, mode="lines",
                              stream=io.StringIO())
    display.eta(10.0, TrainerTotals(step=10, phase="warmup"))
    assert display.eta(20.0, TrainerTotals(step=50, phase="warmup")) == pytest.approx(12.5)
    # Candidate steps are slower than warm-up steps: the rate is measured again.
    assert display.eta(30.0, TrainerTotals(step=55, phase="candidates")) is None
    assert display.eta(40.0, TrainerTotals(step=60, decided=20, phase="candidates")) == \
        pytest.approx(max(40 * 10 / 5, 80 * 10 / 20))


def test_rescore_progress_prints_a_line_per_interval_with_an_eta() -> None:
    import io

    from pipeline.run.progress import CountProgress

    now = [0.0]
    out = io.StringIO()
    shown = CountProgress(100, "rescored", interval=10.0, stream=out, clock=lambda: now[0])
    now[0] = 5.0
    shown.update(10)  # within the interval: no line
    assert out.getvalue() == ""
    now[0] = 12.0
    shown.update(10)  # 20 of 100 in 12 s: 80 more take 48 s
    now[0] = 60.0
    shown.update(80)
    shown.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("rescored 20/100, ETA 48 s"), lines
    assert lines[-1].endswith("rescored 100/100") and len(lines) == 3, lines


def test_a_trainer_waiting_for_candidates_sees_an_interrupt() -> None:
    import threading

    from pipeline.run.feed import CandidateFeed

    never = threading.Event()

    def stalled():  # a stream whose next batch does not come (e.g. generation scaling up)
        never.wait(30)
        yield {"x": 1}

    feed = CandidateFeed(stalled())
    asked = threading.Event()
    threading.Timer(0.3, asked.set).start()
    started = time.monotonic()
    batch, waited = feed.next(block=True, interrupted=asked.is_set)
    assert batch is None and 0.2 < waited < 3 and time.monotonic() - started < 3
    never.set()
    feed.close()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_second_interrupt_exits_at_once(name: str) -> None:
    """Ctrl-C and SIGTERM (what a scheduler sends) take the same handler."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    script = (
        "import os, signal, time\n"
        "from pipeline.run.job import StopOnSignal\n"
        "class Board:\n"
        "    class request_stop:\n"
        "        @staticmethod\n"
        "        def remote(reason): print('stop asked:', reason, flush=True)\n"
        "with StopOnSignal(Board(), print):\n"
        f"    os.kill(os.getpid(), signal.{name})\n"
        "    time.sleep(0.2)\n"
        f"    os.kill(os.getpid(), signal.{name})\n"
        "    time.sleep(30)\n"
        "print('not reached')\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - started < 20
    assert done.returncode == 128 + getattr(signal, name), done.stdout + done.stderr
    assert f"stop asked: {name}" in done.stdout and "second interrupt: exiting now" in done.stdout
    assert "not reached" not in done.stdout


def test_check_names_an_initial_checkpoint_of_another_architecture(tmp_path: Path,
                                                                   builtin_data: Path) -> None:
    from trainer.factory import build_detector

    small = tmp_path / "small.pt"
    torch.save(build_detector(13, arch="small").module.state_dict(), small)
    base = [f"output.dir={tmp_path / 'out'}", f"data.root={builtin_data}",
            f"training.init_checkpoint={small}"]
    report = preflight(load_config(DEMO_CONFIG, [*base, "training.arch=resnet50_fpn"]))
    problems = [p.line() for p in report.problems if p.key == "training.init_checkpoint"]
    assert len(problems) == 1 and "another architecture" in problems[0], report.problems
    assert "training.arch=resnet50_fpn" in problems[0]
    report = preflight(load_config(DEMO_CONFIG, base))  # the small model it was saved from
    assert not [p for p in report.problems if p.key == "training.init_checkpoint"], \
        report.problems
    assert any("entries load from" in p for p in report.passed), report.passed


def test_a_failing_stage_names_itself_and_its_batch() -> None:
    import numpy as np

    from pipeline.run.graph import StageError, TimedStage
    from pipeline.run.job import _worker_error_line

    def broken() -> object:
        def stage(batch: dict) -> dict:
            raise ValueError("image_size must be >= 16 px, got -5")
        return stage

    timed = TimedStage("generate", broken, {})
    batch = {"sample_id": np.array(["s-1", "s-2", "s-3"])}
    with pytest.raises(StageError) as info:
        timed(batch)
    said = str(info.value)
    assert said == ("the generate stage failed on a batch of 3 candidates, s-1 .. s-3: "
                    "ValueError: image_size must be >= 16 px, got -5")
    # as the driver finds it at the end of a worker's traceback
    text = ("ray::MapWorker(MapBatches(TimedStage)).submit()\n  File x.py, line 1\n"
            "ValueError: image_size must be >= 16 px, got -5\n\nThe above exception was the "
            f"direct cause of the following exception:\n\npipeline.run.graph.StageError: {said}")
    assert _worker_error_line(RuntimeError(text)).endswith(f"StageError: {said}")

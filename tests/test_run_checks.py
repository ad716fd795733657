"""What `bsgal run` checks before anything starts, and the plain pieces of the run (no Ray)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.storage.checkpoints import config_hash, load_trainer_state, save_main, save_rank_state
from pipeline.cli import main
from pipeline.demand import check_fits
from pipeline.config import ConfigError, load_config
from pipeline.run.feed import END, CandidateFeed
from pipeline.run.job import run_job
from pipeline.storage.run_dir import RunExistsError
from pipeline.storage.redaction import redact, redacted_config
from pipeline.storage.run_config import resume_config
from pipeline.storage.run_dir import RunDir
from pipeline.run.window import WindowStats
from tests.conftest import DEMO_CONFIG, free_port


def test_unreachable_s3_output_fails_in_seconds_before_ray_starts(ray_starts: list) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(main, [
        "run", "--config", str(DEMO_CONFIG), "output.dir=s3://bsgal-missing/run",
        f"output.storage_options={{endpoint_url: '{endpoint}', key: AKIAEXAMPLE, "
        "secret: do-not-print-me}"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert "output s3://bsgal-missing/run is not writable" in result.output
    assert "endpoint_url" in result.output  # says what to check
    assert "do-not-print-me" not in result.output
    assert elapsed < 30
    assert ray_starts == []


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    cfg = load_config(DEMO_CONFIG, [f"output.dir={out}"])
    with pytest.raises(RunExistsError, match="bsgal run --resume"):
        run_job(cfg, progress="off")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--fresh"])
    assert result.exit_code == 1 and "not a bsgal run folder" in result.output
    assert out.exists()  # --fresh refused to delete a folder that is not a run


def test_job_that_does_not_fit_the_cluster_names_the_keys() -> None:
    cfg = load_config(DEMO_CONFIG, ["generation.num_gpus=1", "training.use_gpu=true"])
    with pytest.raises(ConfigError, match="no GPU") as info:
        check_fits(cfg, cpus=2, gpus=0)
    assert "generation.concurrency x generation.num_gpus = 1" in str(info.value)
    assert "training.num_workers (training.use_gpu=true) = 1" in str(info.value)
    cfg = load_config(DEMO_CONFIG, ["generation.concurrency=4", "generation.num_cpus=1"])
    with pytest.raises(ConfigError, match=r"needs 5\.\d+ CPUs at once but the Ray cluster has 2"):
        check_fits(cfg, cpus=2, gpus=0)
    check_fits(load_config(DEMO_CONFIG), cpus=2, gpus=0)  # the demo fits two cores


def test_secrets_are_redacted_and_resume_takes_them_from_elsewhere(tmp_path: Path) -> None:
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA", "secret": "s3cr3t",
               "client_kwargs": {"aws_session_token": "t0k3n", "region_name": "eu"}}
    assert redact(options) == {"endpoint_url": "http://127.0.0.1:9000", "key": "<redacted>",
                               "secret": "<redacted>",
                               "client_kwargs": {"aws_session_token": "<redacted>",
                                                 "region_name": "eu"}}
    out = tmp_path / "run"
    cfg = load_config(DEMO_CONFIG, [f"output.dir={out}"])
    cfg.output.storage_options.update(options)
    run = RunDir(str(out))
    run.write_text("config.yaml", yaml.safe_dump(redacted_config(cfg), sort_keys=False))
    text = (out / "config.yaml").read_text()
    assert "s3cr3t" not in text and "AKIA" not in text and "t0k3n" not in text

    resumed = resume_config(str(out), ["ray.address=auto", "output.storage_options.key=K2"])
    assert resumed.ray.address == "auto"
    assert resumed.output.storage_options == {"endpoint_url": "http://127.0.0.1:9000",
                                              "key": "K2", "client_kwargs": {"region_name": "eu"}}
    assert config_hash(resumed) == config_hash(cfg)
    run.write_bytes("checkpoints/step-000000004.pt", b"x")  # decisions are kept from here on
    with pytest.raises(ConfigError, match="selection.threshold, training.steps cannot change"):
        resume_config(str(out), ["training.steps=400", "selection.threshold=calibrated"])


def _trainer_state(rank: int) -> dict:
    torch.manual_seed(rank)
    return {"format": "bsgal-trainer/1", "step": 8, "model": {"w": torch.randn(2, 2)},
            "optimizer": {"lr": 0.1}, "stream_offset": 10 + rank, "selector": {"c": rank},
            "sampler": {"s": rank}, "test_sampler": {"t": rank}, "copy_paste": {"p": rank},
            "rng": {"torch": torch.get_rng_state()}}


def test_checkpoint_keeps_model_once_and_each_rank_its_own_state(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    for step in (4, 8):
        save_rank_state(run, step, 1, _trainer_state(1))
        save_main(run, step, _trainer_state(0), [{"rank": 0, "stream_offset": 10},
                                                 {"rank": 1, "stream_offset": 11}], "h", keep=1)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000000008.json", "step-000000008.pt", "step-000000008.rank001.pt"]
    rank1 = load_trainer_state(run, "checkpoints/step-000000008.pt", 1)
    rank0 = load_trainer_state(run, "checkpoints/step-000000008.pt", 0)
    assert torch.equal(rank1["model"]["w"], rank0["model"]["w"])  # shared, saved once
    assert rank1["stream_offset"] == 11 and rank1["selector"] == {"c": 1}
    assert rank0["stream_offset"] == 10 and rank0["selector"] == {"c": 0}
    assert torch.equal(rank1["rng"]["torch"], _trainer_state(1)["rng"]["torch"])


def test_feed_waits_polls_ends_and_raises() -> None:
    import threading

    gate = threading.Event()

    def batches():
        yield {"sample_id": np.array(["a"])}
        gate.wait(5)
        yield {"sample_id": np.array(["b"])}

    feed = CandidateFeed(batches(), depth=1)
    first, _ = feed.next()
    assert list(first["sample_id"]) == ["a"]
    assert feed.next(block=False) == (None, pytest.approx(0, abs=0.1))  # late: nothing yet
    gate.set()
    second, waited = feed.next()
    assert list(second["sample_id"]) == ["b"] and waited >= 0
    assert feed.next()[0] is END and feed.exhausted
    feed.close()

    def broken():
        yield {"sample_id": np.array(["a"])}
        raise OSError("stage failed")

    feed = CandidateFeed(broken())
    feed.next()
    with pytest.raises(OSError, match="stage failed"):
        feed.next()
    feed.close()


def test_window_summary_rates_and_quantiles() -> None:
    w = WindowStats(stage_pools={"generate": 2, "annotate": 1, "check": 1}, first_step=10)
    batch = {"sample_id": np.array(["a", "b", "c", "d"]),
             "_seconds_generate": np.full(4, 0.5, np.float32),
             "_seconds_annotate": np.full(4, 0.25, np.float32)}
    w.add_batch(batch, waited=1.0)
    for reason, score in (("accepted", 0.2), ("accepted", 0.4), ("rejected_score", -0.3),
                          ("invalid_empty_mask", float("nan"))):
        w.add_decision({"reason": reason, "score": score, "threshold": -0.05})
    w.add_step("candidates", 3.0, 1.5)
    record = w.close(step=12)
    assert record["decisions"] == {"accepted": 2, "rejected": 1, "invalid": 1}
    assert record["acceptance_rate"] == pytest.approx(2 / 3)
    assert record["score_quantiles"]["q50"] == pytest.approx(0.2)
    assert record["wait_fraction"] == pytest.approx(0.25)
    assert record["stages"]["generate"]["per_actor_per_second"] == pytest.approx(2.0)
    assert record["stages"]["generate"]["pool_per_second"] == pytest.approx(4.0)
    assert record["stages"]["annotate"]["per_actor_per_second"] == pytest.approx(4.0)
    assert record["stages"]["check"]["per_actor_per_second"] is None
    assert (record["first_step"], record["last_step"]) == (10, 11)
    assert w.arrived == 0 and w.first_step == 12  # the next window starts empty


def test_resume_may_move_stages_but_not_change_what_they_decide() -> None:
    base = config_hash(load_config(DEMO_CONFIG))
    placed = load_config(DEMO_CONFIG, ["generation.resources={accelerator_type:A100: 0.01}",
                                       "annotation.resources={sam_node: 1}",
                                       "training.resources_per_worker={trainer_node: 1}"])
    assert config_hash(placed) == base
    assert config_hash(load_config(DEMO_CONFIG, ["selection.fixed_threshold=-0.1"])) != base


def test_check_states_the_class_caches_memory_and_refuses_caches_that_do_not_fit(
        tmp_path: Path, builtin_data: Path) -> None:
    from tests.conftest import invoke_cli

    keys = [f"output.dir={tmp_path / 'out'}", f"data.root={builtin_data}"]
    code, out = invoke_cli("check", "--config", str(DEMO_CONFIG), *keys)
    assert code == 0, out
    assert "class caches (sketched, input basis): 8,373 numbers" in out
    code, out = invoke_cli("check", "--config", str(DEMO_CONFIG), *keys,
                           "selection.cache_sketch=none", "selection.cache_memory_mb=10")
    assert code == 1
    assert "exceed selection.cache_memory_mb=10" in out
    assert "set selection.cache_sketch=input_basis" in out
    code, out = invoke_cli("config", "show", "--config", str(DEMO_CONFIG))
    assert "# selection memory (the built-in set's classes): class caches" in out

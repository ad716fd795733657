"""Shared test set-up: deterministic, single-threaded, offline, loopback only."""

from __future__ import annotations

import os

# Set before torch/ray are imported anywhere in the test session: 2-core CI machines
# oversubscribe badly with one intra-op thread pool per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from typing import Any  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
#: The small CPU demo config (``bsgal demo``), the base most pipeline tests override.
DEMO_CONFIG = CONFIGS / "demo.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke_cli(*args: str) -> tuple[int, str]:
    """``bsgal ARGS`` in-process (click's runner): exit code and output; a Python exception
    (anything but ``SystemExit``) propagates."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


class S3Server:
    """A real moto S3 server in its own process on 127.0.0.1 (started by the ``s3`` fixture)."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options that reach this server (credentials are moto's dummies)."""
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options)
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """Start ``moto_server`` on a free loopback port for the session; stop it after."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start; see {log}") from None
            time.sleep(0.2)
    mp = pytest.MonkeyPatch()
    # s3fs/botocore read these; moto accepts any credentials.
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        yield S3Server(url)
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray (2 CPUs) for every test that runs Ray in this process, started once.

    It starts after the S3 fixture has set the AWS_* variables, so that its workers inherit
    them, the way cluster nodes get credentials from the standard AWS chain. Tests that need a
    Ray of their own run it in other processes and say so: real `bsgal run` processes with
    their own local Ray (tests/test_faults_ray.py, tests/test_interrupts_ray.py) and a
    `ray start --head` cluster (tests/test_submit_ray.py).
    """
    ray = pytest.importorskip("ray")
    from pipeline.cluster.connect import start_local_ray

    start_local_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


#: Candidates of the demo-sized Ray runs (`overrides`).
CANDIDATES = 48


def overrides(data: Path, **extra: object) -> list[str]:
    """A demo-shaped run that takes ~30 s on 2 cores: few candidates, few steps, a checkpoint
    every 4 steps (at steps 4, 8 and 12)."""
    keys = {
        "data.root": str(data), "data.max_val_images": 6,
        "generation.num_candidates": CANDIDATES, "generation.batch_size": 16,
        "annotation.batch_size": 16, "annotation.check_batch_size": 8,
        "training.steps": 12, "training.warmup_real_steps": 2, "training.warmup_steps": 2,
        "training.checkpoint_every": 4, "training.candidate_batch_size": 8,
        "output.shard_max_rows": 8, "output.shard_flush_seconds": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in keys.items()]


@pytest.fixture(scope="session")
def demo_ray_run(local_ray, builtin_data: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Any]:
    """One demo-sized `bsgal demo` on the session's Ray, to a relative --out as users type it,
    while the annotator actor holding candidate #20 dies (Ray Data restarts it). Read by the
    pipeline tests (what the run left) and the rescore tests (its checkpoints at steps 4, 8 and
    12 judge the stored candidates again): one run instead of one per module."""
    import functools

    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.run import job
    from pipeline.run.datasets import train_categories
    from pipeline.run.demo import demo_config
    from pipeline.run.graph import StageKill

    out = tmp_path_factory.mktemp("run-a") / "out"
    marker = out.parent / "annotator-killed"
    keys = overrides(builtin_data, **{"output.keep_checkpoints": 5})
    cfg = demo_config(keys, str(out))
    victim = str(job.prompt_sampler(cfg, train_categories(cfg.data)).sample_batch(21)[
        "sample_id"][20])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "run_job", functools.partial(
            job.run_job, faults=job.Faults(kill_stage=StageKill("annotate", victim,
                                                                str(marker)))))
        # A relative --out: Ray Train workers run in folders of their own.
        mp.chdir(out.parent)
        result = CliRunner().invoke(main, ["demo", "--out", out.name, "--progress", "lines",
                                           *keys])
    assert result.exit_code == 0, result.output
    return {"out": out, "marker": marker, "output": result.output}


@pytest.fixture
def ray_starts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every attempt of this test to start or join Ray (``ray.init``), each refused: a check
    that a command failed before Ray, whether or not the session's Ray is up."""
    ray = pytest.importorskip("ray")
    calls: list = []

    def refused(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise RuntimeError("this test must not start Ray")

    monkeypatch.setattr(ray, "init", refused)
    return calls


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in long-tailed set (LVIS-format folder), written once per session."""
    from trainer.datasets.builtin import write_builtin_dataset

    root = tmp_path_factory.mktemp("builtin")
    return write_builtin_dataset(root, seed=0, num_train_images=240, num_val_images=60)


@pytest.fixture(scope="module")
def train_set(request: pytest.FixtureRequest, builtin_data: Path):
    """The built-in training split, its first ``TRAIN_IMAGES`` images (a constant of the test
    module that asks for it), loaded once per module."""
    from trainer.datasets import LvisDataset

    return LvisDataset(builtin_data, "train.json", max_images=request.module.TRAIN_IMAGES)


def make_params() -> list[torch.Tensor]:
    """Two parameters, shapes (2,) and (2, 1): 4 elements in the flat layout."""
    from torch import nn

    return [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 1))]


# ------------------------------------------------------------------ a run folder with shards

# (class_id, class_name, frequency, [(reason, truth_failure), ...]): the decisions of a small
# run whose every count is known. 22 rows: 10 accepted, 9 rejected, 3 invalid.
PLAN = [
    (1, "cat", "f", [("accepted", "none")] * 5 + [("accepted", "wrong_class"),
                     ("rejected_score", "none"), ("rejected_score", "broken"),
                     ("invalid_empty_mask", "none")]),
    (2, "dog", "c", [("accepted", "none")] * 3 + [("rejected_score", "none")]
     + [("rejected_score", "clutter")] * 2),
    (3, "yak", "r", [("accepted", "broken")] + [("rejected_score", "none")] * 2
     + [("rejected_score", "noise")] * 2 + [("invalid_empty_mask", "none"),
                                             ("invalid_area_ratio", "broken")]),
]
ROWS_PER_STEP = 3

# Untrusted text as shards may hold it (class names, frequency, and the prompts and sample ids
# make_rows derives from the names): markup, a script end tag, paths that climb, an absolute
# path with a backslash and a NUL.
HOSTILE_PLAN = [
    (1, "<img src=x onerror=alert(1)>", 'r"><img src=y onerror=alert(2)>',
     [("accepted", "none"), ("rejected_score", "none")]),
    (2, "</script><script>alert(3)</script>", "c", [("accepted", "none")] * 2),
    (3, "../../evil", "f", [("accepted", "none")] * 2),
    (4, "/abs\\..\\x\x00y", "f", [("accepted", "none")]),
]


def make_rows(plan=PLAN, size: tuple[int, int] = (40, 48), seed: int = 0,
              truth: bool = True) -> list[dict]:
    """Decision rows for ``plan``, interleaved round-robin over classes in stream order.

    Images are a grey background with one object drawn by the built-in looks; the mask is the
    object's pixels (empty for ``invalid_empty_mask``). Accepted rows score above their
    threshold, rejected ones below, invalid ones have no score. The threshold rises with the
    step (a dynamic threshold).
    """
    import numpy as np

    from generators.looks import make_looks, render_object

    rng = np.random.default_rng(seed)
    looks = make_looks(max(cid for cid, *_ in plan))
    queues = [[(cid, name, freq, reason, tf) for reason, tf in items]
              for cid, name, freq, items in plan]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    h, w = size
    rows = []
    for offset, (cid, name, freq, reason, tf) in enumerate(order):
        step = offset // ROWS_PER_STEP
        threshold = -0.05 + 0.01 * step
        image = np.full((h, w, 3), 200, dtype=np.uint8)
        mask = np.zeros((h, w), dtype=bool)
        if reason != "invalid_empty_mask":
            bh, bw = int(rng.integers(h // 2, h - 4)), int(rng.integers(w // 2, w - 4))
            y0, x0 = int(rng.integers(1, h - bh)), int(rng.integers(1, w - bw))
            rgb, m = render_object(looks[cid - 1], bh, bw, rng)
            image[y0:y0 + bh, x0:x0 + bw][m] = rgb[m]
            mask[y0:y0 + bh, x0:x0 + bw] = m
        if reason == "accepted":
            score = threshold + 0.02 + 0.01 * (offset % 5)
        elif reason.startswith("rejected"):
            score = threshold - 0.02 - 0.01 * (offset % 5)
        else:
            score = float("nan")
        rows.append({
            "run_id": "inspect-test", "sample_id": f"{name}-{offset:04d}",
            "stream_offset": offset, "class_id": cid, "class_name": name,
            "class_frequency": freq, "prompt": f"a photo of a single {name}", "seed": offset,
            "prompt_option": offset % 2, "stream_position": offset,
            "generator": "procedural@1", "annotator": "builtin@1",
            "status": "ok" if not reason.startswith("invalid") else reason,
            "image": image, "mask": mask, "mask_score": 0.9, "area_ratio": float(mask.mean()),
            "num_components": 1, "truth_failure": tf if truth else "",
            "truth_class_id": cid if truth else -1, "score": score, "threshold": threshold,
            "accepted": reason == "accepted", "reason": reason, "step": step, "rank": 0,
            "cache_norm": 1.0, "batch_id": f"b{step}", "method": "bsgal",
            # device-seconds per stage (invalid rows were never scored or trained on)
            "cost_generate": 0.5, "cost_annotate": 0.2, "cost_check": 0.05,
            "cost_score": 0.0 if reason.startswith("invalid") else 0.1,
            "cost_train": 0.0 if reason.startswith("invalid") else 0.3,
            "cost_units": "generate=CPU,annotate=CPU,check=CPU,score=CPU,train=CPU",
        })
    return rows


def write_run(out: str, rows: list[dict], storage_options: dict | None = None,
              max_rows: int = 8) -> None:
    """``rows`` as decision shards under the run folder ``out`` (the real ShardWriter)."""
    from pipeline.storage.shard_writer import ShardWriter

    with ShardWriter(out, max_rows=max_rows, flush_seconds=60,
                     storage_options=storage_options) as writer:
        writer.add(rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A run folder with the shards of ``make_rows()`` and those rows; one per test module."""
    out = tmp_path_factory.mktemp("run-dir") / "run"
    rows = make_rows()
    write_run(str(out), rows)
    return out, rows


def detector_batch(ds: Any, flags: str = "alternate", start: int = 0
                   ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Four real samples of ``ds`` from ``start`` as detector inputs (image tensors, targets),
    their instances flagged generated by ``flags``: ``alternate`` (every other one),
    ``none`` or ``all``."""
    import numpy as np

    from trainer.backends import image_tensor, target_tensors

    samples = [ds[i] for i in range(start, start + 4)]
    images = [image_tensor(s["image"]) for s in samples]
    targets = []
    for s in samples:
        n = len(s["labels"])
        generated = {"alternate": np.arange(n) % 2 == 0, "none": np.zeros(n, bool),
                     "all": np.ones(n, bool)}[flags]
        targets.append(target_tensors(s["boxes"], s["labels"], s["masks"], generated))
    return images, targets

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

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def builtin_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in long-tailed set (LVIS-format folder), written once per session."""
    from trainer.datasets.builtin import write_builtin_dataset

    root = tmp_path_factory.mktemp("builtin")
    return write_builtin_dataset(root, seed=0, num_train_images=240, num_val_images=60)

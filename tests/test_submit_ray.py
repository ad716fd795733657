"""`bsgal submit` against a real Ray head (``ray start --head`` on 127.0.0.1 with the
dashboard's Job server, auth disabled): a demo-sized job runs to the end and leaves its shards,
`bsgal job stop` stops a running one, and a job that asks for GPUs the cluster lacks is refused
before anything is sent.

The head runs in its own process group and temp dir; teardown ends that group and the workers
that belong to it (never `ray stop`, which would end every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import DEMO_CONFIG, free_port, invoke_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO = str(DEMO_CONFIG)
# Fits 2 CPUs: generation/annotation/check actors at 0.25 CPU each, one train worker at 1;
# generation and training pinned to the head by the custom resources it advertises.
SMALL = ["generation.num_cpus=0.25", "annotation.num_cpus=0.25", "training.warmup_steps=1",
         "training.warmup_real_steps=0",
         "data.max_val_images=8", "generation.resources={bsgal_generate: 0.01}",
         "training.resources_per_worker={bsgal_train: 0.01}"]


@dataclass
class RayHead:
    address: str
    pgid: int
    temp_dir: Path


def _processes_of(temp_dir: Path) -> list[int]:
    """Pids of processes started for this head: their cwd or environment names its temp dir
    (job drivers and workers run in working dirs under it; Ray puts it in their env)."""
    marker = str(temp_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd").encode()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in cwd or marker in env:
            found.append(int(entry.name))
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_head(head: RayHead) -> None:
    if _group_alive(head.pgid):
        os.killpg(head.pgid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _group_alive(head.pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(head.pgid):
            os.killpg(head.pgid, signal.SIGKILL)
    for pid in _processes_of(head.temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short temp dir: Ray's Unix socket paths under it must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="bsgr", dir="/tmp"))
    dashboard = free_port()
    bin_dir = Path(sys.executable).parent
    # Job drivers run `python -m pipeline.cli`: this interpreter must come first on PATH.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--num-gpus=0",
           '--resources={"bsgal_generate": 1, "bsgal_train": 1}', "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    head = RayHead(f"http://127.0.0.1:{dashboard}", proc.pid, temp_dir)
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out.decode()[-3000:]}")
        yield head
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_head(head)


def _job_id(output: str) -> str:
    return next(line.split()[-1] for line in output.splitlines()
                if line.startswith("submitted job "))


def test_demo_job_runs_to_the_end_and_leaves_its_shards(
        ray_head: RayHead, builtin_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO,
                              "--follow", "--env", "BSGAL_PROBE=hidden-value-123", *SMALL,
                              f"data.root={builtin_data}",
                              "generation.num_candidates=16", "training.steps=4",
                              "training.checkpoint_every=2", f"output.dir={out}")
    assert code == 0, output
    job = _job_id(output)
    assert f"shards:    {out}/shards" in output
    assert "candidates made: 16" in output  # the driver's summary, streamed
    assert f"job {job} SUCCEEDED" in output
    assert "BSGAL_PROBE (values not shown)" in output
    assert "hidden-value-123" not in output
    table = pads.dataset(out / "shards", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 16  # one decision per candidate
    assert len(set(table.column("sample_id").to_pylist())) == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 4

    code, output = invoke_cli("job", "status", "--address", ray_head.address, job)
    assert code == 0 and f"{job}: SUCCEEDED" in output
    assert f"shards:     {out}/shards" in output
    code, output = invoke_cli("job", "logs", "--address", ray_head.address, job)
    assert code == 0 and "candidates made: 16" in output
    code, latest = invoke_cli("job", "status", "--address", ray_head.address)  # no id: newest
    assert code == 0 and latest.startswith(f"{job}: SUCCEEDED"), latest
    code, output = invoke_cli("job", "list", "--address", ray_head.address)
    assert f"{job}  SUCCEEDED  {out}" in output


def test_job_stop_ends_a_running_job(ray_head: RayHead, builtin_data: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "long"
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO, *SMALL,
                              f"data.root={builtin_data}", "generation.num_candidates=5000",
                              "training.steps=100000", f"output.dir={out}")
    assert code == 0, output
    job = _job_id(output)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.address)
    deadline = time.monotonic() + 90
    while str(client.get_job_status(job)) != "RUNNING":
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(0.5)
    code, output = invoke_cli("job", "stop", "--address", ray_head.address, job)
    assert code == 0, output
    assert f"job {job} STOPPED" in output
    assert str(client.get_job_status(job)) == "STOPPED"
    # Following a stopped job ends at once with the STOPPED exit code.
    code, output = invoke_cli("job", "logs", "--follow", "--address", ray_head.address, job)
    assert code == 2
    assert f"job {job} STOPPED" in output


def test_gpus_the_cluster_lacks_are_refused_before_submitting(
        ray_head: RayHead, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(ray_head.address).list_jobs())
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO, *SMALL,
                              "generation.num_gpus=1", f"output.dir={tmp_path / 'gpu'}")
    assert code == 1
    assert "the job does not fit the cluster" in output
    assert "generation.concurrency x generation.num_gpus = 1" in output
    assert "no GPU" in output
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO, *SMALL,
                              "annotation.resources={bsgal_annotate: 0.01}",
                              f"output.dir={tmp_path / 'pin'}")
    assert code == 1
    assert "custom resource bsgal_annotate" in output
    assert len(JobSubmissionClient(ray_head.address).list_jobs()) == before
    code, output = invoke_cli("job", "status", "--address", ray_head.address, "no-such-job")
    assert code == 1 and "no job 'no-such-job'" in output


def test_output_that_holds_a_run_or_cannot_be_written_is_refused(
        ray_head: RayHead, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("name: x\n")
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO, *SMALL,
                              f"output.dir={taken}")
    assert code == 1 and "already holds a run" in output and "--resume" in output
    blocked = tmp_path / "file"
    blocked.write_text("")
    code, output = invoke_cli("submit", "--address", ray_head.address, "--config", DEMO, *SMALL,
                              f"output.dir={blocked}/run")
    assert code == 1 and "is not writable" in output

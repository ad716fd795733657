"""`bsgal submit` without a cluster: addresses, paths, the job's working directory, the
resource-fit check against node shapes, and the fast failure on an unreachable address."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.cluster.capacity import (
    ClusterCapacity,
    NodeShape,
    autoscaler_max_resources,
    check_capacity,
    launcher_capacity,
    reports_autoscaling,
    units_that_fit,
)
from pipeline.cluster.job_client import (
    JobServerError,
    exit_code,
    is_local_address,
    job_server_url,
)
from pipeline.cluster.submit import (
    CONFIG_NAME,
    PACKAGES,
    build_submission,
    forwarded_env,
)
from pipeline.config import ConfigError, load_config
from pipeline.demand import run_requests
from tests.conftest import DEMO_CONFIG, free_port

# ----------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("given, url", [
    ("head", "http://head:8265"),
    ("10.0.0.5:9000", "http://10.0.0.5:9000"),
    ("https://ray.example.org/", "https://ray.example.org"),
    ("https://example.org/ray/", "https://example.org/ray"),
    ("http://[::1]:8265", "http://[::1]:8265"),
    ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
])
def test_job_server_url(given: str, url: str) -> None:
    assert job_server_url(given) == url


@pytest.mark.parametrize("given, words", [
    ("ray://head:10001", "not the Ray Client"),
    ("auto", "not the Ray Client"),
    ("head:6379", "GCS port"),
    ("", "RAY_API_SERVER_ADDRESS"),
    ("ftp://head", "http://HOST:PORT"),
])
def test_job_server_url_rejects_other_ports(given: str, words: str) -> None:
    with pytest.raises(JobServerError, match=words):
        job_server_url(given)


def test_local_addresses() -> None:
    assert is_local_address("http://127.0.0.1:8265")
    assert is_local_address("http://localhost:8265")
    assert not is_local_address("http://10.1.2.3:8265")


def test_exit_codes() -> None:
    assert [exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 2, 3]


def test_unreachable_address_fails_fast_with_one_line() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = CliRunner().invoke(main, ["submit", "--address", f"127.0.0.1:{port}",
                                       "--config", str(DEMO_CONFIG)])
    took = time.monotonic() - started
    assert result.exit_code == 1
    assert f"cannot reach the Ray Job server at http://127.0.0.1:{port}" in result.output
    assert "Connection refused" in result.output
    assert "Traceback" not in result.output
    assert took < 10


def test_job_commands_fail_fast_when_unreachable() -> None:
    port = free_port()
    for args in (["job", "status", "x"], ["job", "stop", "x"], ["job", "logs", "x"],
                 ["job", "list"]):
        result = CliRunner().invoke(main, [*args, "--address", f"127.0.0.1:{port}"])
        assert result.exit_code == 1, args
        assert "cannot reach the Ray Job server" in result.output


# ------------------------------------------------------------------------- the submission


def test_submission_packages_code_and_resolved_config(tmp_path: Path) -> None:
    sub, cfg = build_submission(str(DEMO_CONFIG), ["training.steps=7", "training.warmup_real_steps=0",
                                                      "output.dir=s3://b/run"],
                                workdir=tmp_path / "job", local_cluster=False, env=["A=1"])
    assert cfg is not None and cfg.ray.address == "auto"
    for name in PACKAGES:
        assert (tmp_path / "job" / name / "__init__.py").is_file()
    assert not list((tmp_path / "job").rglob("__pycache__"))
    shipped = load_config(tmp_path / "job" / CONFIG_NAME)
    assert shipped.training.steps == 7
    assert shipped.output.dir == "s3://b/run"
    assert shipped.ray.address == "auto"
    assert sub.entrypoint == ("python -m pipeline.cli run --config bsgal-job.yaml "
                              "--progress lines")
    assert sub.runtime_env == {"working_dir": str(tmp_path / "job"),
                               "env_vars": {"PYTHONUNBUFFERED": "1", "A": "1"}}
    assert sub.metadata["bsgal_out"] == "s3://b/run"
    assert sub.submission_id.startswith("bsgal-demo-")


def test_image_has_code_uploads_the_config_only(tmp_path: Path) -> None:
    build_submission(str(DEMO_CONFIG), ["output.dir=s3://b/run"], workdir=tmp_path / "job",
                     local_cluster=False, image_has_code=True)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [CONFIG_NAME]


def test_remote_cluster_refuses_a_relative_output(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.dir: runs/x is a relative path"):
        build_submission(str(DEMO_CONFIG), ["output.dir=runs/x"], workdir=tmp_path / "job",
                         local_cluster=False)


def test_local_cluster_resolves_relative_paths(tmp_path: Path) -> None:
    _, cfg = build_submission(str(DEMO_CONFIG), ["output.dir=runs/x"], workdir=tmp_path / "job",
                              local_cluster=True, cwd=tmp_path)
    assert cfg is not None
    assert cfg.output.dir == str(tmp_path / "runs" / "x")
    assert cfg.data.root == str(tmp_path / "data" / "builtin")


def test_prompt_files_travel_with_the_job(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"cat": ["a photo of a cat"]}')
    sub, cfg = build_submission(str(DEMO_CONFIG), [f"generation.extra_prompts={prompts}",
                                                   "output.dir=s3://b/run",
                                                   "annotation.sam_checkpoint=models/sam.pth"],
                                workdir=tmp_path / "job", local_cluster=False)
    assert cfg is not None
    shipped = tmp_path / "job" / cfg.generation.extra_prompts
    assert shipped.read_text() == prompts.read_text()
    assert any("annotation.sam_checkpoint: models/sam.pth is relative" in n for n in sub.notes)


def test_credentials_in_config_are_flagged_not_printed(tmp_path: Path) -> None:
    sub, _ = build_submission(str(DEMO_CONFIG), ["output.dir=s3://b/run",
                                                 "output.storage_options.secret=TOPSECRET",
                                                 "data.storage_options.client_kwargs."
                                                 "aws_secret_access_key=TOPSECRET2"],
                              workdir=tmp_path / "job", local_cluster=False)
    text = "\n".join(sub.notes) + sub.entrypoint
    assert "output.storage_options.secret" in text
    assert "data.storage_options.client_kwargs.aws_secret_access_key" in text
    assert "TOPSECRET" not in text


def test_resume_refuses_credentials_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass them with --env"):
        build_submission(None, ["output.storage_options.secret=x"], workdir=tmp_path / "j",
                         local_cluster=False, resume_out="/shared/run")


def test_resume_of_a_remote_local_folder_is_left_to_the_cluster(tmp_path: Path) -> None:
    sub, cfg = build_submission(None, ["ray.log_to_driver=true"], workdir=tmp_path / "j",
                                local_cluster=False, resume_out="/shared/run")
    assert cfg is None
    assert sub.entrypoint == ("python -m pipeline.cli run --resume /shared/run --progress "
                              "lines ray.address=auto ray.log_to_driver=true")
    assert "working_dir" in sub.runtime_env  # the code travels
    sub, _ = build_submission(None, [], workdir=tmp_path / "k", local_cluster=False,
                              resume_out="/shared/run", image_has_code=True)
    assert "working_dir" not in sub.runtime_env  # nothing to upload


def test_forwarded_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BSGAL_TEST_TOKEN", "v")
    assert forwarded_env(["BSGAL_TEST_TOKEN", "X=1"]) == {"BSGAL_TEST_TOKEN": "v", "X": "1"}
    monkeypatch.delenv("BSGAL_TEST_TOKEN")
    with pytest.raises(ConfigError, match="not set in this environment"):
        forwarded_env(["BSGAL_TEST_TOKEN"])
    with pytest.raises(ConfigError, match="not an environment variable name"):
        forwarded_env(["1BAD"])


# ------------------------------------------------------------------------- resource fit


def _cap(*nodes: NodeShape, bound: bool = True) -> ClusterCapacity:
    return ClusterCapacity(tuple(nodes), bound=bound, source="test nodes")


GPU_CONFIG = ["generation.num_gpus=1", "generation.num_cpus=1", "generation.concurrency=4",
              "generation.resources={bsgal_generate: 0.01}", "annotation.num_gpus=1",
              "annotation.resources={bsgal_annotate: 0.01}", "training.use_gpu=true",
              "training.num_workers=2", "training.resources_per_worker={bsgal_train: 0.01}"]
NODES = (NodeShape("gen", {"CPU": 8, "GPU": 1, "bsgal_generate": 1}, 4),
         NodeShape("ann", {"CPU": 8, "GPU": 1, "bsgal_annotate": 1}, 1),
         NodeShape("train", {"CPU": 16, "GPU": 2, "bsgal_train": 1}, 1))


def test_run_requests_list_every_pool() -> None:
    cfg = load_config(DEMO_CONFIG, GPU_CONFIG)
    by_part = {r.part: r for r in run_requests(cfg)}
    assert by_part["generation"].unit == {"CPU": 1.0, "GPU": 1.0, "bsgal_generate": 0.01}
    assert by_part["generation"].count == 4
    assert by_part["training"].unit == {"CPU": 1.0, "GPU": 1.0, "bsgal_train": 0.01}


def test_pinned_job_fits_matching_node_types() -> None:
    assert check_capacity(load_config(DEMO_CONFIG, GPU_CONFIG), _cap(*NODES)) == []


def test_more_generation_actors_than_pinned_gpus_is_refused() -> None:
    cfg = load_config(DEMO_CONFIG, [*GPU_CONFIG, "generation.concurrency=5"])
    with pytest.raises(ConfigError) as err:
        check_capacity(cfg, _cap(*NODES))
    text = str(err.value)
    # 7 GPUs exist in total but only 4 of them are on nodes that offer bsgal_generate.
    assert "generation: 5 x {CPU: 1, GPU: 1, bsgal_generate: 0.01}" in text
    assert "the nodes hold 4" in text


def test_missing_custom_resource_is_named() -> None:
    cfg = load_config(DEMO_CONFIG, [*GPU_CONFIG, "training.resources_per_worker={bsgal_tpu: 1}"])
    with pytest.raises(ConfigError, match="custom resource bsgal_tpu"):
        check_capacity(cfg, _cap(*NODES))


def test_gpus_asked_of_a_cpu_cluster_are_refused() -> None:
    cfg = load_config(DEMO_CONFIG, ["generation.num_gpus=1"])
    with pytest.raises(ConfigError, match="no GPU"):
        check_capacity(cfg, _cap(NodeShape("cpu", {"CPU": 64})))


def test_autoscaling_cluster_only_warns() -> None:
    cfg = load_config(DEMO_CONFIG, GPU_CONFIG)
    warnings = check_capacity(cfg, _cap(NodeShape("head", {"CPU": 4}), bound=False))
    assert warnings and all("the autoscaler may add nodes" in w for w in warnings)


def test_units_that_fit_counts_per_node() -> None:
    cap = _cap(NodeShape("a", {"CPU": 8, "GPU": 2}, 3), NodeShape("b", {"CPU": 1}, 5))
    assert units_that_fit({"CPU": 2, "GPU": 1}, cap) == 6
    assert units_that_fit({"CPU": 0.25}, cap) == 3 * 32 + 5 * 4


def test_read_only_autoscaler_report_is_a_fixed_cluster() -> None:
    fixed = {"autoscalerReport": {"nodeTypeMapping": {"ab12": "node_ab12"},
                                  "pendingLaunches": {}, "pendingNodes": []}}
    grows = {"autoscalerReport": {"nodeTypeMapping": {"ab12": "gen-gpu"}}}
    assert not reports_autoscaling(fixed)
    assert not reports_autoscaling({})
    assert reports_autoscaling(grows)


def test_launcher_capacity_counts_max_workers(tmp_path: Path) -> None:
    config = {"max_workers": 3, "head_node_type": "h",
              "available_node_types": {
                  "h": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                  "g": {"resources": {"CPU": 8, "GPU": 1}, "node_config": {},
                        "max_workers": 10}}}
    cap = launcher_capacity(config)
    assert cap.bound
    assert cap.total("GPU") == 3  # capped by the global max_workers
    assert cap.total("CPU") == 2 + 24
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    assert autoscaler_max_resources(path) == {"CPU": 26.0, "GPU": 3.0}
    assert autoscaler_max_resources(tmp_path / "absent.yaml") is None


def test_resume_on_a_local_cluster_reads_and_checks_the_run(tmp_path: Path) -> None:
    from pipeline.cluster.submit import check_output
    from pipeline.config import dump_config

    out = tmp_path / "runs" / "r1"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(load_config(DEMO_CONFIG, [f"output.dir={out}"])))
    sub, cfg = build_submission(None, ["ray.log_to_driver=true"], workdir=tmp_path / "j",
                                local_cluster=True, resume_out="runs/r1", cwd=tmp_path)
    assert cfg is not None and cfg.ray.log_to_driver
    assert sub.entrypoint == (f"python -m pipeline.cli run --resume {out} --progress lines "
                              "ray.address=auto ray.log_to_driver=true")
    assert check_output(cfg, local_cluster=True, resume=True) == f"output {out}: writable"
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already finished"):
        check_output(cfg, local_cluster=True, resume=True)
    (out / "summary.json").unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-000000004.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="decision_keys|cannot change here"):
        build_submission(None, ["training.steps=400"], workdir=tmp_path / "k",
                         local_cluster=True, resume_out=str(out))


class _LogsWithoutWebsocket:
    """A Job server client whose log stream is refused (a proxy without websockets): the log
    grows over three polls while the job runs, then the job fails."""

    def __init__(self) -> None:
        self.polls = 0

    async def tail_job_logs(self, job_id: str):
        raise RuntimeError("websocket refused")
        yield ""  # pragma: no cover - makes this an async generator

    def get_job_status(self, job_id: str) -> str:
        return "FAILED" if self.polls >= 3 else "RUNNING"

    def get_job_logs(self, job_id: str) -> str:
        self.polls += 1
        return "".join(f"line {i}\n" for i in range(min(self.polls, 3)))


def test_follow_falls_back_to_polling_without_repeating_lines() -> None:
    from pipeline.cluster.job_client import follow_job

    chunks: list[str] = []
    status = follow_job(_LogsWithoutWebsocket(), "j", chunks.append, poll=0.01)
    assert status == "FAILED"
    assert "".join(chunks) == "line 0\nline 1\nline 2\n"


@pytest.mark.s3
def test_s3_output_is_probed_from_here(s3_server, tmp_path: Path) -> None:
    import json as _json

    import s3fs

    from pipeline.cluster.submit import check_output
    from pipeline.storage.filesystem import StorageError

    options = _json.dumps(s3_server.storage_options)
    bucket = s3_server.make_bucket("bsgal-submit")

    def cfg_for(out: str):
        return load_config(DEMO_CONFIG, [f"output.dir={out}", f"output.storage_options={options}"])

    with pytest.raises(StorageError) as err:
        check_output(cfg_for("s3://no-such-bucket-here/run"), local_cluster=False,
                     resume=False)
    assert "s3://no-such-bucket-here/run is not writable" in str(err.value)
    assert "--no-output-check" in str(err.value)
    assert check_output(cfg_for(f"{bucket}/run"), local_cluster=False,
                        resume=False) == f"output {bucket}/run: writable"
    s3fs.S3FileSystem(**s3_server.storage_options).pipe(f"{bucket}/old/config.yaml", b"x")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_output(cfg_for(f"{bucket}/old"), local_cluster=False, resume=False)
    # A local path on a remote cluster cannot be seen from here.
    note = check_output(load_config(DEMO_CONFIG, ["output.dir=/shared/run"]), local_cluster=False,
                        resume=False)
    assert note == "output /shared/run: checked on the cluster when the job starts"

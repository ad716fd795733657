"""The whole job on a real local Ray: Ray Data stages into a Ray Train worker, Parquet decision
shards on local disk and on a real S3 server (moto), a stage actor killed mid-run, a trainer
killed mid-run and resumed, and two DDP workers. One Ray instance serves the module."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

from pipeline.run import job  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.run.demo import demo_config  # noqa: E402
from pipeline.run.job import Faults, TrainingFailed, run_job  # noqa: E402
from pipeline.inspection.run_summary import summary_text as job_summary_text  # noqa: E402
from pipeline.storage.run_dir import RunDir, read_metrics  # noqa: E402
from pipeline.storage.shard_schema import decode_rle, PART_NAME  # noqa: E402
from pipeline.storage.shards import read_decisions  # noqa: E402
from tests.conftest import CANDIDATES, overrides  # noqa: E402

COMPARED = ["reason", "accepted", "score", "threshold", "step", "stream_offset", "batch_id",
            "cache_norm"]


@pytest.fixture(scope="module")
def run_a(demo_ray_run):
    """`bsgal demo` to a local folder while the annotator actor holding candidate #20 dies
    (tests/conftest.py: the session's demo-sized Ray run)."""
    return demo_ray_run


def test_local_run_survives_a_killed_actor_and_every_candidate_has_one_row(run_a) -> None:
    out: Path = run_a["out"]
    assert run_a["marker"].exists()  # the annotator actor did die mid-run
    # Conservation: candidates made = accepted + rejected + invalid rows, no duplicates.
    summary = json.loads((out / "summary.json").read_text())
    d = summary["decisions"]
    assert d["accepted"] + d["rejected"] + d["invalid"] == CANDIDATES == d["rows"]
    assert d["distinct_sample_ids"] == CANDIDATES and summary["counts_add_up"]
    table = read_decisions(str(out))
    assert table.num_rows == CANDIDATES
    assert sorted(table.column("stream_offset").to_pylist()) == list(range(CANDIDATES))
    assert set(table.column("run_id").to_pylist()) == {"demo"}
    assert set(table.column("class_frequency").to_pylist()) <= {"f", "c", "r"}
    # Hive layout, offset-named parts, readable without bsgal (pyarrow, DuckDB).
    files = sorted((out / "shards").glob("decision=*/*"))
    assert files and all(PART_NAME.match(f.name) for f in files)
    assert {f.parent.name for f in files} <= {"decision=accepted", "decision=rejected",
                                              "decision=invalid"}
    row = pq.read_table(files[0]).slice(0, 1).to_pylist()[0]
    image = np.asarray(Image.open(io.BytesIO(row["image_png"])))
    assert image.shape == (128, 128, 3)
    assert decode_rle(row["mask_rle"]).shape == (128, 128)
    import duckdb

    counts = dict(duckdb.sql(
        f"SELECT decision, count(*) FROM read_parquet('{out}/shards/**/*.parquet', "
        "hive_partitioning = true) GROUP BY decision").fetchall())
    assert counts == {k: v for k, v in (("accepted", d["accepted"]), ("rejected", d["rejected"]),
                                        ("invalid", d["invalid"])) if v}
    # Run folder: config, metrics over time, checkpoints, evaluation; the printed summary.
    saved = load_config(out / "config.yaml")
    assert saved.generation.num_candidates == CANDIDATES and saved.output.dir == str(out)
    records = read_metrics(RunDir(str(out)))
    kinds = {r["kind"] for r in records}
    assert {"job_start", "step", "window", "checkpoint", "eval", "worker_done",
            "job_done"} <= kinds
    window = [r for r in records if r["kind"] == "window"][-1]
    assert 0 <= window["wait_fraction"] <= 1 and window["stages"]["generate"]["busy_seconds"] > 0
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(len(steps))) and len(steps) >= 12
    assert RunDir(str(out)).latest_checkpoint() is not None
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) >= {"bbox", "segm"} and "APr" in ev["segm"]
    for text in ("candidates made: 48", "acceptance by frequency group", "segm AP",
                 f"bsgal inspect {out}", "counts add up"):
        assert text in run_a["output"]
    assert "train step" in run_a["output"]  # progress lines (stdout is not a terminal here)


def test_inspect_reads_the_run(run_a, tmp_path: Path) -> None:
    out = str(run_a["out"])
    result = CliRunner().invoke(main, ["inspect", out])
    assert result.exit_code == 0, result.output
    assert f"{CANDIDATES} decisions" in result.output
    assert "Acceptance by frequency group" in result.output
    html = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["inspect", out, "--html", str(html)])
    assert result.exit_code == 0, result.output
    assert html.stat().st_size > 1000 and "<img" in html.read_text()


def test_s3_run_killed_after_a_checkpoint_resumes_to_the_same_decisions(
        run_a, s3_server, builtin_data: Path) -> None:
    import s3fs

    bucket = s3_server.make_bucket("bsgal-resume")
    out = f"{bucket}/runs/b"
    opts = dict(s3_server.storage_options)  # endpoint + credentials (redacted on disk)
    # training.max_failures=0: the run ends at the crash and is resumed by hand (a run that
    # restarts by itself is tested in tests/test_cluster_ray.py).
    cfg = demo_config(overrides(builtin_data, **{"output.storage_options": json.dumps(opts),
                                                 "training.max_failures": 0}), out)
    with pytest.raises(TrainingFailed, match="training.max_failures=0 restarts were allowed"):
        run_job(cfg, progress="off", faults=Faults(crash_at_step=11))
    fs = s3fs.S3FileSystem(**opts)
    root = out.removeprefix("s3://")
    assert opts["secret"] not in fs.cat(f"{root}/config.yaml").decode()
    run = RunDir(out, opts)
    name = run.latest_checkpoint()
    info = run.read_json(name.replace(".pt", ".json"))
    assert 0 < info["step"] < 11
    offset = info["ranks"][0]["stream_offset"]
    parts = [PART_NAME.match(p.rsplit("/", 1)[-1]) for p in fs.find(f"{root}/shards")]
    assert any(m and int(m["start"]) >= offset for m in parts)  # rows past the checkpoint

    # Resume through the CLI; credentials come from the AWS environment, not the config.
    result = CliRunner().invoke(main, ["run", "--resume", out, "--endpoint-url",
                                       s3_server.endpoint_url, "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "shard files written after the checkpoint removed" \
        in result.output
    fs.invalidate_cache()  # this process listed the shards before the resumed run rewrote some
    b = read_decisions(out, storage_options=opts).to_pandas().set_index("sample_id")
    a = read_decisions(str(run_a["out"])).to_pandas().set_index("sample_id")
    assert not b.index.duplicated().any() and len(b) == CANDIDATES
    assert sorted(a.index) == sorted(b.index)
    b = b.loc[a.index]
    for column in COMPARED:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        same = (x == y) | (a[column].isna().to_numpy() & b[column].isna().to_numpy())
        assert same.all(), column
    eval_a = json.loads((run_a["out"] / "eval.json").read_text())
    assert run.read_json("eval.json")["segm"] == eval_a["segm"]
    assert run.read_json("summary.json")["counts_add_up"]


def test_two_ddp_workers_stay_in_step_and_decide_every_candidate(
        local_ray, builtin_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cfg = demo_config(overrides(builtin_data, **{"training.num_workers": 2,
                                                 "training.num_cpus_per_worker": 0.5}), str(out))
    result = run_job(cfg, progress="off")
    s = result.summary
    assert s["counts_add_up"] and s["decisions"]["rows"] == CANDIDATES
    table = read_decisions(str(out)).to_pandas()
    assert set(table["rank"]) == {0, 1}  # both workers judged candidates
    for rank, rows in table.groupby("rank"):
        assert sorted(rows["stream_offset"]) == list(range(len(rows)))
    workers = {w["rank"]: w for w in s["workers"]}
    assert workers[0]["step"] == workers[1]["step"] >= 12  # same number of DDP steps
    assert sum(w["decided"] for w in workers.values()) == CANDIDATES
    names = {p.name for p in (out / "checkpoints").iterdir()}
    final = s["final_step"]
    assert {f"step-{final:09d}.pt", f"step-{final:09d}.json",
            f"step-{final:09d}.rank001.pt"} <= names


def test_a_cluster_that_autoscales_is_judged_by_what_it_may_grow_to(
        local_ray, builtin_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from pipeline.cluster.connect import connect
    from pipeline.demand import check_fits
    from pipeline.config import ConfigError

    cfg = demo_config(overrides(builtin_data, **{"generation.num_gpus": 1}), str(tmp_path / "o"))
    monkeypatch.setenv("HOME", str(tmp_path))
    conn = connect(cfg)  # the module's Ray: 2 CPUs, no GPU, no autoscaler
    assert (conn.started, conn.gpus, conn.max_gpus) == (False, 0.0, 0.0)
    with pytest.raises(ConfigError, match="generation.concurrency x generation.num_gpus"):
        check_fits(cfg, conn.max_cpus, conn.max_gpus)
    # The launcher's bootstrap config on the head: a GPU node type that starts at 0 nodes.
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({
        "max_workers": 2, "head_node_type": "head", "available_node_types": {
            "head": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "node_config": {}, "max_workers": 2}}}))
    conn = connect(cfg)
    assert (conn.gpus, conn.max_gpus, conn.max_cpus) == (0.0, 2.0, 18.0)
    check_fits(cfg, conn.max_cpus, conn.max_gpus)


CLOSED_LOOP = {"feedback.policy": "yield_aware", "feedback.template_policy": "bandit",
               "generation.prompt_template": '["a photo of a single {name}", "{name}"]',
               "generation.failure_by_option": "[0.2, 2.0]", "output.log_every": 2,
               "generation.batch_size": 8}


def _allocations(out: Path) -> list[dict]:
    return [r for r in read_metrics(RunDir(str(out))) if r.get("kind") == "allocation"]


def test_closed_loop_steers_generation_resumes_with_its_state_and_outlives_its_actor(
        local_ray, builtin_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "closed"
    cfg = demo_config(overrides(builtin_data, **CLOSED_LOOP, **{"training.max_failures": 0}),
                      str(out))
    with pytest.raises(TrainingFailed):
        run_job(cfg, progress="off", faults=Faults(crash_at_step=11))
    run = RunDir(str(out))
    info = run.read_json(run.latest_checkpoint().replace(".pt", ".json"))
    saved = info["ranks"][0]["feedback"]
    assert saved["state"]["decisions"] == info["ranks"][0]["stream_offset"] > 0
    # Resumed, and its demand actor killed two steps later: it goes on open loop.
    killed_at = info["step"] + 2
    result = job.resume_job(str(out), progress="off",
                            faults=Faults(kill_demand_at_step=killed_at))
    s = result.summary
    assert s["counts_add_up"] and s["decisions"]["rows"] == CANDIDATES
    table = read_decisions(str(out)).to_pandas()
    assert sorted(table["stream_position"]) == list(range(CANDIDATES))
    assert set(table["prompt_option"]) == {0, 1}
    steered = table[table["allocation_step"] >= 0]
    # The first batches are drawn before any decision; later ones from the trainer's.
    assert len(steered) > 0 and (table["allocation_step"] < 0).any()
    assert (steered["step"] >= steered["allocation_step"]).all()
    records = _allocations(out)
    after = [r for r in records if info["step"] < r["step"] < killed_at and "classes" in r]
    # The resumed actor continued from the checkpoint's counts.
    assert after and sum(c["decided"] for c in after[0]["classes"].values()) >= \
        saved["state"]["decisions"]
    assert abs(sum(c["share"] for c in after[0]["classes"].values()) - 1) < 1e-3
    assert any("unavailable" in r for r in records if r["step"] >= killed_at)
    # The trainer's warning reached this console (worker output does not: log_to_driver off).
    err = capsys.readouterr().err
    assert "bsgal warning (trainer rank 0): feedback: the demand actor is unavailable" in err, err
    fb = s["feedback"]
    assert fb["lag_steps"]["rows"] == len(steered) and fb["lag_steps"]["max"] >= 0
    assert "closed loop:" in job_summary_text(s)
    html = tmp_path / "closed.html"
    r = CliRunner().invoke(main, ["inspect", str(out), "--html", str(html)])
    assert r.exit_code == 0, r.output
    page = html.read_text()
    assert 'id="allocation-chart"' in page and 'id="options-table"' in page

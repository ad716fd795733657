"""bsgal inspect: tables and filters on shards the test writes (known counts), SQL filter, S3."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.inspection import TABLE_NAMES
from pipeline.storage.shards import list_shard_files
from tests.conftest import free_port, invoke_cli, make_rows, write_run


def _json(*args: str) -> dict:
    code, out = invoke_cli(*args, "--json")
    assert code == 0, out
    return json.loads(out)


def _by(rows: list[dict], key: str) -> dict:
    return {r[key]: r for r in rows}


def _expected(rows: list[dict], keep=lambda r: True) -> dict:
    """Counts computed in plain Python from the rows the test wrote."""
    sel = [r for r in rows if keep(r)]
    dec = {"accepted": 0, "rejected": 0, "invalid": 0}
    for r in sel:
        dec["accepted" if r["reason"] == "accepted" else r["reason"].split("_")[0]] += 1
    return {"n": len(sel), **dec}


# -------------------------------------------------------------------------------- tables


def test_counts_groups_classes_match_the_written_rows(run_dir) -> None:
    out, rows = run_dir
    doc = _json("inspect", str(out))
    assert doc["total_rows"] == doc["selected_rows"] == 22
    assert doc["files"] == len(list_shard_files(str(out / "shards")))
    counts = {(r["decision"], r["reason"]): r["n"] for r in doc["tables"]["counts"]["rows"]}
    assert counts == {("accepted", "accepted"): 10, ("rejected", "rejected_score"): 9,
                      ("invalid", "invalid_empty_mask"): 2, ("invalid", "invalid_area_ratio"): 1}
    groups = _by(doc["tables"]["groups"]["rows"], "group")
    assert [r["group"] for r in doc["tables"]["groups"]["rows"]] == ["frequent", "common", "rare"]
    assert (groups["frequent"]["accepted"], groups["frequent"]["total"]) == (6, 9)
    assert groups["rare"]["accept_rate"] == pytest.approx(1 / 7)
    assert groups["rare"]["accept_rate_scored"] == pytest.approx(1 / 5)
    classes = doc["tables"]["classes"]["rows"]
    assert [c["class_name"] for c in classes] == ["cat", "dog", "yak"]  # most accepted first
    for c in classes:
        exp = _expected(rows, lambda r, n=c["class_name"]: r["class_name"] == n)
        assert (c["total"], c["accepted"], c["rejected"], c["invalid"]) == (
            exp["n"], exp["accepted"], exp["rejected"], exp["invalid"])


def test_score_quantiles_steps_and_truth(run_dir) -> None:
    out, rows = run_dir
    doc = _json("inspect", str(out), "--step-bins", "4")
    scores = _by(doc["tables"]["scores"]["rows"], "value")
    acc = sorted(r["score"] for r in rows if r["accepted"])
    assert scores["score (accepted)"]["n"] == 10
    assert scores["score (accepted)"]["min"] == pytest.approx(acc[0])
    assert scores["score (accepted)"]["p50"] == pytest.approx(float(np.median(acc)))
    assert scores["score (scored)"]["n"] == 19  # invalid rows have no score
    assert scores["threshold"]["max"] == pytest.approx(
        max(r["threshold"] for r in rows if not r["reason"].startswith("invalid")))
    steps = doc["tables"]["steps"]["rows"]
    assert len(steps) == 4 and steps[0]["step_from"] == 0 and steps[-1]["step_to"] == 7
    assert sum(s["total"] for s in steps) == 22
    assert sum(s["accepted"] for s in steps) == 10
    first = [r for r in rows if r["step"] <= steps[0]["step_to"]]
    assert steps[0]["accepted"] == sum(r["accepted"] for r in first)
    # Truth: 14 good candidates, 8 of them accepted, 10 accepted in all.
    truth = _by(doc["tables"]["truth"]["rows"], "scope")
    assert (truth["all"]["known"], truth["all"]["good"], truth["all"]["good_accepted"]) == (
        22, 14, 8)
    assert truth["all"]["precision"] == pytest.approx(8 / 10)
    assert truth["all"]["recall"] == pytest.approx(8 / 14)
    assert truth["scored"]["recall"] == pytest.approx(8 / 12)
    failures = _by(doc["tables"]["truth_failures"]["rows"], "truth_failure")
    assert failures["broken"]["accepted"] == 1 and failures["broken"]["total"] == 3
    assert failures["clutter"]["accept_rate"] == 0


def test_filters_combine_with_and(run_dir) -> None:
    out, rows = run_dir
    doc = _json("inspect", str(out), "--class", "yak", "--decision", "rejected")
    assert doc["selected_rows"] == 4
    assert doc["filters"] == {"class": ["yak"], "decision": ["rejected"]}
    doc = _json("inspect", str(out), "--class", "1", "--class", "dog", "--reason", "invalid_*")
    assert doc["selected_rows"] == 1  # cat's one invalid; dog has none
    doc = _json("inspect", str(out), "--reason", "invalid_*", "--reason", "accepted")
    assert doc["selected_rows"] == 13
    assert {r["decision"] for r in doc["tables"]["counts"]["rows"]} == {"accepted", "invalid"}


def test_sql_where_filter(run_dir) -> None:
    out, rows = run_dir
    predicate = "score > threshold + 0.035 AND step < 5"
    doc = _json("inspect", str(out), "--where", predicate, "--rows", "--limit", "0")
    want = sorted(r["sample_id"] for r in rows
                  if r["score"] > r["threshold"] + 0.035 and r["step"] < 5)
    assert len(want) >= 2
    assert sorted(r["sample_id"] for r in doc["tables"]["rows"]["rows"]) == want
    assert doc["selected_rows"] == len(want)
    # Combined with --class by AND; the partition column is visible to the predicate.
    doc = _json("inspect", str(out), "--class", "cat", "--where", "decision = 'invalid'")
    assert doc["selected_rows"] == 1


def test_bad_where_is_one_line_with_duckdb_message(run_dir) -> None:
    out, _ = run_dir
    code, text = invoke_cli("inspect", str(out), "--where", "scroe > 1")
    assert code != 0
    assert text.startswith("Error: --where 'scroe > 1': Binder Error")
    assert '"scroe"' in text and len(text.strip().splitlines()) == 1
    code, text = invoke_cli("inspect", str(out), "--where", "1=1); DROP VIEW decisions; SELECT (1")
    assert code != 0 and len(text.strip().splitlines()) == 1
    code, text = invoke_cli("inspect", str(out), "--class", "zebra")
    assert code != 0 and "'zebra'" in text and "cat, dog, yak" in text
    code, text = invoke_cli("inspect", str(out), "--class", "Dgo")
    assert code != 0 and "did you mean 'dog'?" in text, text


@pytest.mark.parametrize("predicate, why", [
    ("1=1) OR (1=1", "unbalanced parentheses"),
    ("score > 0 AND (step < 3", "unbalanced parentheses"),
    ("1=1; DROP VIEW decisions", "';' is not allowed"),
    ("step IN (SELECT step FROM decisions)", "subqueries"),
    ("EXISTS (SELECT 1)", "subqueries"),
    ("step = 1 UNION SELECT 1", "syntax error"),
    ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "subqueries"),
    ("read_parquet('/etc/passwd') IS NULL", "table function read_parquet()"),
    ("step = 1 -- everything after this is cut", "comments"),
    ("step = 1 /* a comment */", "comments"),
    ("   ", "empty"),
])
def test_where_is_one_expression_or_an_error(run_dir, predicate: str, why: str) -> None:
    out, _ = run_dir
    code, text = invoke_cli("inspect", str(out), "--class", "cat", "--where", predicate)
    assert code == 1 and len(text.strip().splitlines()) == 1, text
    assert text.startswith(f"Error: --where {predicate!r}: ") and why in text
    assert "give one boolean expression over the shard columns" in text


def test_where_only_narrows_the_other_filters(run_dir) -> None:
    out, rows = run_dir
    n_cat = sum(r["class_name"] == "cat" for r in rows)
    # OR inside the predicate stays inside it; parentheses and ')' in strings are fine.
    doc = _json("inspect", str(out), "--class", "cat", "--where",
                "(1=1) OR (1=1) OR prompt LIKE '%)%'")
    assert doc["selected_rows"] == n_cat < len(rows)
    doc = _json("inspect", str(out), "--class", "cat", "--where",
                "decision = 'invalid' OR score > threshold")
    assert doc["selected_rows"] == sum(r["class_name"] == "cat" and (
        r["reason"].startswith("invalid") or r["accepted"]) for r in rows)


def test_query_connection_reads_the_shards_and_nothing_else(run_dir, tmp_path: Path) -> None:
    import duckdb

    from pipeline.inspection.query import DecisionFilter, DecisionQuery

    out, rows = run_dir
    other = tmp_path / "other.csv"
    other.write_text("a\n1\n")
    with DecisionQuery(str(out), DecisionFilter(where="score > threshold")) as q:
        assert q.count() == sum(r["accepted"] for r in rows)
        assert len(q.media([rows[0]["sample_id"]])) == 1  # the images are still read
        with pytest.raises(duckdb.PermissionException, match="disabled by configuration"):
            q.con.execute(f"SELECT * FROM read_csv('{other}')").fetchall()
        with pytest.raises(duckdb.PermissionException):
            q.con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'written.csv'}'")
        with pytest.raises(duckdb.Error, match="locked"):
            q.con.execute("SET enable_external_access = true")
    assert not (tmp_path / "written.csv").exists()


def test_text_csv_and_rows_output(run_dir) -> None:
    out, rows = run_dir
    code, text = invoke_cli("inspect", str(out), "--top", "1")
    assert code == 0
    assert "Acceptance by frequency group" in text and "precision" in text
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("class_id"))
    assert lines[header + 2].split()[1] == "cat"  # most accepted
    assert "1 more row" in lines[header + 3]
    assert lines[header + 4].split()[1] == "yak"  # least accepted
    code, text = invoke_cli("inspect", str(out), "--csv", "--table", "classes")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["class_name"] for r in table] == ["cat", "dog", "yak"]
    assert float(table[0]["accept_rate"]) == pytest.approx(6 / 9)
    code, text = invoke_cli("inspect", str(out), "--csv", "--rows", "--decision", "invalid")
    assert code == 0
    listed = list(csv.DictReader(io.StringIO(text)))
    assert sorted(r["sample_id"] for r in listed) == sorted(
        r["sample_id"] for r in rows if r["reason"].startswith("invalid"))
    assert all(r["score"] == "" for r in listed)  # NaN scores are empty cells
    code, text = invoke_cli("inspect", str(out), "--csv")
    assert code != 0 and "--csv prints one table" in text


def test_truth_unknown_skips_precision_recall(tmp_path: Path) -> None:
    write_run(str(tmp_path / "run"), make_rows(truth=False))
    doc = _json("inspect", str(tmp_path / "run" / "shards"))  # the shards folder works too
    assert "truth" not in doc["tables"] and "truth_failures" not in doc["tables"]
    assert any("precision/recall skipped" in n for n in doc["notes"])
    code, text = invoke_cli("inspect", str(tmp_path / "run"))
    assert code == 0 and "note: precision/recall skipped" in text


def test_thresholds_per_class_beside_the_calibrated_reference(tmp_path: Path) -> None:
    from pipeline.storage.run_dir import MetricsLog, RunDir

    out = tmp_path / "run"
    rows = make_rows()
    write_run(str(out), rows)
    doc = _json("inspect", str(out), "--table", "thresholds")
    got = _by(doc["tables"]["thresholds"]["rows"], "class_name")
    for name, r in got.items():
        scored = [x for x in rows if x["class_name"] == name
                  and not x["reason"].startswith("invalid")]
        assert r["scored"] == len(scored)
        assert r["kept"] == pytest.approx(sum(x["accepted"] for x in scored) / len(scored))
        assert r["threshold_median"] == pytest.approx(
            float(np.median([x["threshold"] for x in scored])))
        assert "reference_median" not in r  # no calibration record: no reference columns
    cat = next(x["class_id"] for x in rows if x["class_name"] == "cat")
    log = MetricsLog(RunDir(str(out)))
    log.log("calibration", step=2, rank=0, classes={str(cat): {
        "reference_scores": 3.0, "reference_median": 0.1, "reference_p05": 0.0,
        "threshold": 0.0, "own_reference": 0.0}})
    log.log("calibration", step=4, rank=0, classes={str(cat): {
        "reference_scores": 12.0, "reference_median": 0.5, "reference_p05": 0.25,
        "threshold": 0.2, "own_reference": 1.0}})
    log.log("calibration", step=6, rank=1, classes={})  # other ranks' records are not read
    got = _by(_json("inspect", str(out), "--table", "thresholds")["tables"]["thresholds"]["rows"],
              "class_name")
    assert (got["cat"]["reference"], got["cat"]["reference_scores"],
            got["cat"]["reference_median"]) == ("own", 12, 0.5)
    assert got["dog"]["reference"] == "" and got["dog"]["reference_median"] is None


def test_every_table_can_be_chosen(run_dir) -> None:
    out, _ = run_dir
    for name in TABLE_NAMES:
        doc = _json("inspect", str(out), "--table", name)
        assert list(doc["tables"]) == [name]
        assert doc["tables"][name]["rows"], name


# ----------------------------------------------------------------------------- bad input


def test_a_truncated_shard_is_named_with_the_fix_or_skipped_on_request(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rows = make_rows()
    write_run(str(out), rows)
    files = list_shard_files(str(out / "shards"))
    bad = files[1]
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 2])
    for command in (["inspect", str(out)], ["export-pool", str(out), str(tmp_path / "pool")]):
        code, text = invoke_cli(*command)
        assert code != 0 and bad in text and "--skip-unreadable" in text, text
        assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    code, text = invoke_cli("inspect", str(out), "--skip-unreadable", "--json")
    assert code == 0, text
    doc = json.loads(text[text.index("{"):])
    assert doc["files"] == len(files) - 1
    assert "1 unreadable shard file(s) left out" in text and bad in text
    code, text = invoke_cli("export-pool", str(out), str(tmp_path / "pool"), "--skip-unreadable")
    assert code == 0 and "exported" in text, text
    # As a pool source there is no such flag: the message says only what does help.
    from pipeline.storage.pool_index import PoolFormatError, read_shard_pool

    with pytest.raises(PoolFormatError, match="move the file out") as err:
        read_shard_pool(str(out), ("accepted", "rejected"))
    assert bad in str(err.value) and "--skip-unreadable" not in str(err.value)


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(
        run_dir, tmp_path: Path) -> None:
    from pipeline.run.rescore import _check_fresh

    out, _ = run_dir
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["inspect", str(out), "--html", str(tmp_path)], "is a folder; name a file"),
             (["inspect", str(out), "--html", str(a_file / "r.html")], "is a file, not a folder"),
             (["export-pool", str(out), str(a_file)], "is a file; name a folder")]
    for args, said in cases:
        code, text = invoke_cli(*args)
        assert code != 0 and said in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(Exception, match="--out .*is a file; name a folder"):
        _check_fresh(str(a_file), {})


def test_path_without_shards(tmp_path: Path) -> None:
    code, text = invoke_cli("inspect", str(tmp_path))
    assert code == 1 and "no decision shards found" in text
    assert len(text.strip().splitlines()) == 1
    code, text = invoke_cli("inspect", str(tmp_path / "missing"))
    assert code == 1 and "no such folder" in text


def test_other_schema_version(tmp_path: Path) -> None:
    write_run(str(tmp_path), make_rows()[:4])
    path = list_shard_files(str(tmp_path / "shards"))[0]
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"bsgal.schema_version": b"9"}), path)
    code, text = invoke_cli("inspect", str(tmp_path))
    assert code == 1 and "shard schema version 9" in text
    assert len(text.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ S3


@pytest.mark.s3
def test_inspect_over_s3(s3_server) -> None:
    bucket = s3_server.make_bucket("inspect-test")
    rows = make_rows()
    write_run(f"{bucket}/runs/a", rows, s3_server.storage_options)
    doc = _json("inspect", f"{bucket}/runs/a", "--endpoint-url", s3_server.endpoint_url,
                "--where", "score > 0", "--class", "cat")
    want = [r for r in rows if r["class_name"] == "cat" and r["score"] > 0]
    assert doc["selected_rows"] == len(want) > 0
    counts = {r["reason"]: r["n"] for r in doc["tables"]["counts"]["rows"]}
    assert counts == {"accepted": sum(r["accepted"] for r in want)} | (
        {"rejected_score": len(want) - sum(r["accepted"] for r in want)}
        if len(want) > sum(r["accepted"] for r in want) else {})
    # The HTML report can be written to the bucket too.
    code, text = invoke_cli("inspect", f"{bucket}/runs/a", "--endpoint-url",
                            s3_server.endpoint_url, "--html", f"{bucket}/reports/a.html")
    assert code == 0, text
    import s3fs

    page = s3fs.S3FileSystem(**s3_server.storage_options).cat(f"{bucket}/reports/a.html")
    assert page.startswith(b"<!DOCTYPE html>") and page.count(b"<img src=\"data:") == 22
    # A missing bucket on a reachable server: one line, non-zero.
    code, text = invoke_cli("inspect", "s3://no-such-bucket/run", "--endpoint-url",
                            s3_server.endpoint_url)
    assert code == 1 and "no-such-bucket" in text and len(text.strip().splitlines()) == 1


def test_next_hint_names_the_endpoint_but_no_credentials() -> None:
    from pipeline.inspection.run_summary import endpoint_hint

    assert endpoint_hint("s3://b/run", {"endpoint_url": "http://127.0.0.1:9000"}) == (
        "http://127.0.0.1:9000")
    assert endpoint_hint("s3://b/run", {"client_kwargs": {
        "endpoint_url": "https://AKIA:s3cr3t@minio.local:9443/"}}) == "https://minio.local:9443/"
    assert endpoint_hint("runs/demo", {"endpoint_url": "http://127.0.0.1:9000"}) is None
    assert endpoint_hint("s3://b/run", {"key": "k", "secret": "s"}) is None


@pytest.mark.s3
def test_end_of_run_hint_over_s3_has_the_endpoint(s3_server) -> None:
    import dataclasses

    from pipeline.config import load_config
    from pipeline.inspection.run_summary import summarize_run, summary_text
    from tests.conftest import DEMO_CONFIG

    bucket = s3_server.make_bucket("hint-test")
    rows = make_rows()
    write_run(f"{bucket}/runs/h", rows, s3_server.storage_options)
    cfg = load_config(DEMO_CONFIG, [f"output.dir={bucket}/runs/h",
                                    f"generation.num_candidates={len(rows)}"])
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(
        cfg.output, storage_options=s3_server.storage_options))
    text = summary_text(summarize_run(cfg))
    hint = f"{bucket}/runs/h --endpoint-url {s3_server.endpoint_url}"
    assert f"next: bsgal inspect {hint}\n" in text
    assert f"bsgal inspect {hint} --html {bucket}/runs/h/report.html" in text
    assert "testing" not in text  # the key and secret are not printed
    # The printed command works as printed.
    code, out = invoke_cli("inspect", f"{bucket}/runs/h", "--endpoint-url",
                           s3_server.endpoint_url, "--json")
    assert code == 0 and json.loads(out)["total_rows"] == len(rows)


@pytest.mark.s3
def test_unreachable_endpoint_fails_fast_with_one_line() -> None:
    t0 = time.monotonic()
    result = CliRunner(env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}).invoke(
        main, ["inspect", "s3://nowhere/run", "--endpoint-url",
               f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert time.monotonic() - t0 < 20
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("Error: cannot read s3://nowhere/run") and "endpoint_url" in line


def test_decision_choices_are_the_reason_kinds_and_the_cli_starts_light() -> None:
    import subprocess
    import sys

    from generators.columns import DECISION_KINDS
    from pipeline.inspection import DECISION_CHOICES

    assert DECISION_CHOICES == DECISION_KINDS
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.cli; print(' '.join(sorted(m for m in "
         "('numpy', 'fsspec', 'torch', 'ray', 'duckdb', 'pyarrow') if m in sys.modules)))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []  # `bsgal --help` imports none of the heavy libraries

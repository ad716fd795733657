"""Decision shards: real Parquet, atomic files, resume without duplicates, local and S3."""

from __future__ import annotations

import io
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.storage.filesystem import StorageError
from pipeline.storage.shard_schema import (
    SHARD_SCHEMA_VERSION,
    ShardSchemaError,
    decode_rle,
)
from pipeline.storage.shard_writer import ShardWriter, preflight_writable
from pipeline.storage.shards import drop_after, list_shard_files, read_decisions

REASONS = ["accepted", "rejected_score", "invalid_empty_mask", "accepted", "rejected_score"]


def _rows(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + n):
        reason = REASONS[i % len(REASONS)]
        mask = np.zeros((16, 20), dtype=bool)
        mask[2 : 2 + i % 10 + 1, 3:9] = True
        rows.append({
            "run_id": "t", "sample_id": f"s{i:05d}", "stream_offset": i, "class_id": i % 3 + 1,
            "class_name": f"c{i % 3 + 1}", "class_frequency": "rcf"[i % 3], "prompt": "p",
            "seed": i, "generator": "procedural@1", "annotator": "builtin@1", "status": "ok",
            "image": rng.integers(0, 255, (16, 20, 3), dtype=np.uint8), "mask": mask,
            "mask_score": 0.9, "area_ratio": mask.mean(), "num_components": 1,
            "score": 0.1 * (i % 7) - 0.3, "threshold": -0.05, "accepted": reason == "accepted",
            "reason": reason, "step": i // 4, "rank": 0, "cache_norm": 1.5,
            "batch_id": f"b{i // 4}", "method": "bsgal",
        })
    return rows


def test_rows_round_trip_through_pyarrow_and_duckdb(tmp_path: Path) -> None:
    rows = _rows(23)
    with ShardWriter(str(tmp_path / "run"), max_rows=10, flush_seconds=60) as writer:
        writer.add(rows)
    expected = {"accepted": 9, "rejected": 9, "invalid": 5}  # 4 cycles of REASONS + 3 rows
    assert writer.rows_written == expected
    table = read_decisions(str(tmp_path / "run"))
    assert table.num_rows == 23
    assert sorted(table.column("sample_id").to_pylist()) == [r["sample_id"] for r in rows]
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    for row in rows:
        got = by_id[row["sample_id"]]
        assert got["decision"] == {"accepted": "accepted", "rejected_score": "rejected",
                                   "invalid_empty_mask": "invalid"}[row["reason"]]
        image = np.asarray(Image.open(io.BytesIO(got["image_png"])))
        np.testing.assert_array_equal(image, row["image"])
        np.testing.assert_array_equal(decode_rle(got["mask_rle"]), row["mask"])
        assert got["score"] == pytest.approx(row["score"])
    # DuckDB reads the layout directly, partition column included.
    glob = str(tmp_path / "run" / "shards" / "**" / "*.parquet")
    counts = dict(duckdb.sql(
        f"SELECT decision, count(*) FROM read_parquet('{glob}', hive_partitioning=true) "
        "GROUP BY decision").fetchall())
    assert counts == expected
    meta = pq.read_schema(list_shard_files(str(tmp_path / "run" / "shards"))[0]).metadata
    assert meta[b"bsgal.schema_version"] == str(SHARD_SCHEMA_VERSION).encode()


def test_files_are_named_by_offset_range_and_no_temporaries_remain(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), max_rows=5, flush_seconds=60) as writer:
        writer.add(_rows(12))
    names = {os.path.basename(p) for p in list_shard_files(str(tmp_path / "shards"))}
    assert names == {"part-r000-000000000000-000000000004.parquet",
                     "part-r000-000000000005-000000000009.parquet",
                     "part-r000-000000000010-000000000011.parquet"}
    leftovers = [p for p in (tmp_path / "shards").rglob("*") if p.is_file()
                 and not p.name.startswith("part-")]
    assert leftovers == []


def test_time_based_flush_without_close(tmp_path: Path) -> None:
    import time

    writer = ShardWriter(str(tmp_path), max_rows=1000, flush_seconds=0.2)
    writer.add(_rows(3))
    deadline = time.monotonic() + 10
    # One flush writes one file per decision; wait for all three to appear.
    while len(list_shard_files(str(tmp_path / "shards"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_decisions(str(tmp_path)).num_rows == 3
    writer.close()
    assert len(list_shard_files(str(tmp_path / "shards"))) == 3  # close found nothing left


def test_resume_drops_rows_after_checkpoint_and_rewrites_once(tmp_path: Path) -> None:
    out = str(tmp_path)
    rows = _rows(30)
    writer = ShardWriter(out, max_rows=8, flush_seconds=60)
    writer.add(rows[:16])
    writer.flush()  # a checkpoint at offset 16 flushes first
    writer.add(rows[16:27])  # written after the checkpoint, then the process "crashes"
    writer.flush()
    removed = drop_after(out, rank=0, offset=16)
    assert len(removed) >= 1
    with ShardWriter(out, max_rows=8, flush_seconds=60) as resumed:
        resumed.add(rows[16:])
    ids = read_decisions(out).column("sample_id").to_pylist()
    assert sorted(ids) == [r["sample_id"] for r in rows]  # each exactly once


def test_background_error_surfaces(tmp_path: Path) -> None:
    (tmp_path / "shards").write_text("a file where the shards folder should be")
    writer = ShardWriter(str(tmp_path), max_rows=2, flush_seconds=60)
    with pytest.raises(StorageError, match="writing shards under"):
        writer.add(_rows(4))
        writer.flush()


def test_rows_missing_required_fields_are_refused(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="no field 'reason'"):
            writer.add([{"sample_id": "x", "stream_offset": 0, "accepted": False}])
        with pytest.raises(ValueError, match="not 'accepted', 'rejected_\\*' or 'invalid_\\*'"):
            writer.add([{"sample_id": "x", "stream_offset": 0, "accepted": False,
                         "reason": "maybe"}])


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardSchemaError, match="no decision shards found"):
        read_decisions(str(tmp_path))
    with ShardWriter(str(tmp_path)) as writer:
        writer.add(_rows(2))
    path = list_shard_files(str(tmp_path / "shards"))[0]
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"bsgal.schema_version": b"0"}), path)
    with pytest.raises(ShardSchemaError, match="shard schema version 0"):
        read_decisions(str(tmp_path))


def test_preflight_local(tmp_path: Path) -> None:
    preflight_writable(str(tmp_path / "new" / "run"))
    assert list(tmp_path.iterdir()) == []  # the probe leaves no folder it made behind
    (tmp_path / "kept").mkdir()
    preflight_writable(str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="blocker.*not writable"):
        preflight_writable(str(blocker / "run"))


@pytest.mark.s3
def test_s3_round_trip_and_resume(s3_server) -> None:
    bucket = s3_server.make_bucket("shards-test")
    out = f"{bucket}/runs/a"
    opts = s3_server.storage_options
    preflight_writable(out, opts)
    writer = ShardWriter(out, max_rows=6, flush_seconds=60, storage_options=opts)
    writer.add(_rows(12))
    writer.flush()
    drop_after(out, 0, 6, opts)
    writer.add(_rows(8, start=6))
    writer.close()
    table = read_decisions(out, storage_options=opts)
    assert sorted(table.column("sample_id").to_pylist()) == [f"s{i:05d}" for i in range(14)]


@pytest.mark.s3
def test_listing_sees_files_another_writer_added_since(s3_server) -> None:
    """s3fs caches listings in its (shared) instance: a process that watches a run's shards,
    as the fault benchmark does, must see what the run wrote since its last look."""
    bucket = s3_server.make_bucket("shards-listing")
    out = f"{bucket}/runs/a"
    opts = s3_server.storage_options
    # Another filesystem instance, as in another process: its writes do not touch our cache.
    other = {**opts, "skip_instance_cache": True}
    writer = ShardWriter(out, max_rows=4, flush_seconds=60, storage_options=other)
    writer.add(_rows(4))
    writer.flush()
    first = list_shard_files(f"{out}/shards", opts)
    writer.add(_rows(8, start=4))
    writer.close()
    assert len(list_shard_files(f"{out}/shards", opts)) > len(first) > 0


@pytest.mark.s3
def test_preflight_unreachable_s3_fails_fast(s3_server) -> None:
    import time

    from tests.conftest import free_port

    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="s3://nowhere/run is not writable") as info:
        preflight_writable("s3://nowhere/run", dead)
    assert time.monotonic() - t0 < 30
    assert "endpoint_url" in str(info.value)
    # Missing bucket on a reachable server.
    with pytest.raises(StorageError, match="no-such-bucket"):
        preflight_writable("s3://no-such-bucket/run", s3_server.storage_options)


def test_appended_columns_keep_both_readers_working(tmp_path: Path) -> None:
    """A 2.0 reader (the schema without the appended columns) reads a 2.x file, and this
    reader reads a 2.0 file with the appended columns null."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipeline.storage.shard_schema import (
        SCHEMA,
        SCHEMA_MINOR_KEY,
        SHARD_SCHEMA_MINOR,
    )

    rows = _rows(6)
    for r in rows:
        r["judged_by"] = "runs/x/checkpoints/step-000000004.pt@step4"
    with ShardWriter(str(tmp_path / "new")) as writer:
        writer.add(rows)
    files = list_shard_files(str(tmp_path / "new" / "shards"))
    meta = pq.read_schema(files[0]).metadata
    assert meta[SCHEMA_MINOR_KEY] == str(SHARD_SCHEMA_MINOR).encode()
    assert meta[b"bsgal.schema_version"] == b"2"  # what a 2.0 reader checks
    old_schema = pa.schema([f for f in SCHEMA if f.name != "judged_by"])
    old = pads.dataset(files, schema=old_schema, format="parquet").to_table()
    assert old.num_rows == 6 and "judged_by" not in old.column_names
    assert sorted(old.column("sample_id").to_pylist()) == [r["sample_id"] for r in rows]
    assert set(read_decisions(str(tmp_path / "new")).column("judged_by").to_pylist()) == {
        rows[0]["judged_by"]}
    # a 2.0 file: written without the appended columns
    for path in files:
        table = pq.read_table(path).drop(["judged_by"])
        pq.write_table(table.replace_schema_metadata({b"bsgal.schema_version": b"2"}), path)
    assert read_decisions(str(tmp_path / "new")).column("judged_by").to_pylist() == [None] * 6

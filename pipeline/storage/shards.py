"""Decision shards: one Parquet row per candidate that reached the trainer, on local disk or S3.

Layout (hive-partitioned by decision, readable by pyarrow, pandas and DuckDB without bsgal)::

    OUT/shards/decision=accepted/part-r000-000000000000-000000000255.parquet
    OUT/shards/decision=rejected/part-r000-000000000000-000000000255.parquet
    OUT/shards/decision=invalid/part-r000-000000000256-000000000511.parquet

A file name carries the writer's rank and the range of stream offsets (the position of each
candidate in that rank's candidate stream) that its flush covered. A checkpoint flushes first, so
no file straddles a checkpoint; on resume, :func:`drop_after` removes the files written after
the checkpoint, and the resumed run writes those candidates again exactly once.

Files appear atomically: locally they are written under a hidden temporary name and renamed;
on S3 an object becomes visible only when its upload completes.

Images are PNG bytes (``image_png``); masks are COCO RLE (``mask_rle``: ``{size: [h, w],
counts: str}``). Nothing in a shard is pickled. Query with DuckDB::

    SELECT class_name, avg(accepted::INT) FROM read_parquet('OUT/shards/**/*.parquet',
        hive_partitioning = true) GROUP BY class_name;
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import posixpath
import queue
import re
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
from PIL import Image

from generators.columns import DECISION_KINDS, STATUS_OK, reason_kind
from pipeline.errors import UserError
from pipeline.storage.filesystem import filesystem, is_local, is_uri

#: Version 2 added the provenance columns ``source`` and ``source_id`` (pool candidates);
#: version 1 shards are still read, with those columns null.
SHARD_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCHEMA_VERSION_KEY = b"bsgal.schema_version"
#: Minor versions only append columns, so a reader of version 2.0 reads a 2.x file (it
#: selects the columns it knows and ignores the rest), and this reader reads 2.0 files with
#: the newer columns null. 2.1 appended ``judged_by`` (which detector state decided the row:
#: ``""`` for the run's own trainer, the checkpoint for ``bsgal rescore``); 2.2 appended the
#: cost columns (device-seconds per stage, ``cost_units`` naming GPU or CPU per stage); 2.3
#: appended the closed loop's ``prompt_option`` (which of its class's prompt options the
#: candidate was drawn with), ``stream_position`` (its prompt stream position) and
#: ``allocation_step`` (the trainer step of the allocation it was drawn with; null or -1 open
#: loop).
SHARD_SCHEMA_MINOR = 3
SCHEMA_MINOR_KEY = b"bsgal.schema_minor"
#: The hive partitions of the shards, one per kind of reason.
DECISIONS = DECISION_KINDS
PART_NAME = re.compile(r"^part-r(?P<rank>\d+)-(?P<start>\d+)-(?P<end>\d+)\.parquet$")

MASK_RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("sample_id", pa.string()),
        ("stream_offset", pa.int64()),
        ("class_id", pa.int64()),
        ("class_name", pa.string()),
        ("class_frequency", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("generator", pa.string()),
        ("annotator", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("image_png", pa.binary()),
        ("mask_rle", MASK_RLE_TYPE),
        ("mask_score", pa.float32()),
        ("area_ratio", pa.float32()),
        ("num_components", pa.int32()),
        ("clip_score", pa.float32()),
        ("truth_failure", pa.string()),
        ("truth_class_id", pa.int64()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("accepted", pa.bool_()),
        ("reason", pa.string()),
        ("step", pa.int64()),
        ("rank", pa.int32()),
        ("cache_norm", pa.float64()),
        ("batch_id", pa.string()),
        ("method", pa.string()),
        ("decided_at", pa.timestamp("ms", tz="UTC")),
        # 2.1
        ("judged_by", pa.string()),
        # 2.2
        ("cost_generate", pa.float64()),
        ("cost_annotate", pa.float64()),
        ("cost_check", pa.float64()),
        ("cost_score", pa.float64()),
        ("cost_train", pa.float64()),
        ("cost_units", pa.string()),
        # 2.3
        ("prompt_option", pa.int64()),
        ("stream_position", pa.int64()),
        ("allocation_step", pa.int64()),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SHARD_SCHEMA_VERSION).encode(),
              SCHEMA_MINOR_KEY: str(SHARD_SCHEMA_MINOR).encode()},
)


class StorageError(UserError, RuntimeError):
    """Output storage is unreachable or not writable; the message names the URI and the fix."""


class ShardSchemaError(UserError, ValueError):
    """A shard was written by another schema version, or a folder holds no shards."""


def shards_root(out: str) -> str:
    """``OUT/shards`` for a run folder ``OUT`` (local path or URI)."""
    return f"{out.rstrip('/')}/shards"


# ------------------------------------------------------------------------------ row encoding


def encode_png(image: np.ndarray) -> bytes:
    """H x W x 3 (or H x W x 4) uint8 → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def encode_rle(mask: np.ndarray) -> dict:
    """H x W bool mask → ``{"size": [h, w], "counts": str}`` (COCO compressed RLE)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def decode_rle(rle: dict) -> np.ndarray:
    """Inverse of :func:`encode_rle`: H x W bool."""
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(
        bool
    )


#: Fields every decision row carries; the others get the neutral values below.
REQUIRED_FIELDS = ("sample_id", "stream_offset", "accepted", "reason")
#: Fields written from the row's image and mask, or at writing time.
ENCODED_FIELDS = ("image_png", "mask_rle", "decided_at")
_DEFAULTS = {"status": STATUS_OK, "rank": 0}


def _cast(kind: pa.DataType, value: Any) -> Any:
    """``value`` as the Python type of an Arrow field; None → the neutral value (``""``,
    ``-1``, NaN)."""
    if pa.types.is_string(kind):
        return "" if value is None else str(value)
    if pa.types.is_integer(kind):
        return -1 if value is None else int(value)
    if pa.types.is_floating(kind):
        return math.nan if value is None else float(value)
    if pa.types.is_boolean(kind):
        return bool(value)
    raise TypeError(f"no cast for {kind}")


def to_record(row: dict[str, Any]) -> dict[str, Any]:
    """A candidate row with its decision (numpy image/mask) → a shard record (PNG, RLE).

    Every :data:`SCHEMA` field is filled: :data:`REQUIRED_FIELDS` from the row (KeyError if
    absent), the rest from the row or a neutral value (NaN scores, empty strings, -1), never a
    guess. A mask whose shape or values cannot be encoded is recorded as absent rather than
    crashing the writer; the row keeps its reason.
    """
    record: dict[str, Any] = {}
    for f in SCHEMA:
        if f.name in ENCODED_FIELDS:
            continue
        value = row[f.name] if f.name in REQUIRED_FIELDS else row.get(f.name,
                                                                      _DEFAULTS.get(f.name))
        record[f.name] = _cast(f.type, value)
    image, mask = row.get("image"), row.get("mask")
    record["image_png"] = None
    if image is not None:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
            record["image_png"] = encode_png(arr)
    record["mask_rle"] = None
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 2 and m.size and np.isfinite(m.astype(np.float32)).all():
            record["mask_rle"] = encode_rle(m.astype(bool))
    record["decided_at"] = row.get("decided_at") or _dt.datetime.now(_dt.timezone.utc)
    return record


# ----------------------------------------------------------------------------------- writing


class ShardWriter:
    """Buffers decision rows and writes them as Parquet shards in a background thread.

    ``add`` only enqueues (PNG/RLE encoding and I/O happen off the training thread); a flush
    happens when ``max_rows`` rows are buffered or ``flush_seconds`` have passed since the
    oldest buffered row, and on :meth:`flush` / :meth:`close`. An error in the background
    thread is raised by the next ``add``, ``flush`` or ``close``: nothing is dropped silently.

    Args:
        out: run folder (local path or ``s3://bucket/prefix``); shards go to ``out/shards``.
        rank: writer rank (Ray Train worker), part of every file name.
        max_rows: rows per flush.
        flush_seconds: longest time a row waits in the buffer.
        storage_options: fsspec options (e.g. ``endpoint_url``) for remote folders.
        max_queue_rows: ``add`` blocks when this many rows wait, bounding memory.
    """

    def __init__(
        self,
        out: str,
        rank: int = 0,
        max_rows: int = 256,
        flush_seconds: float = 30.0,
        storage_options: dict | None = None,
        max_queue_rows: int = 4096,
    ) -> None:
        self.root = shards_root(out)
        self.rank = int(rank)
        self.max_rows = int(max_rows)
        self.flush_seconds = float(flush_seconds)
        self.fs, self.root_path = filesystem(self.root, storage_options)
        self._local = is_local(self.fs)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue_rows))
        self._error: BaseException | None = None
        self._closed = False
        self.rows_written = {d: 0 for d in DECISIONS}
        self.files_written: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"ShardWriter-r{rank}",
                                        daemon=True)
        self._thread.start()

    # -- public API (training thread) --

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Enqueue decision rows (each needs ``sample_id``, ``stream_offset``, ``accepted``,
        ``reason``; see :data:`SCHEMA` for the rest)."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        for row in rows:
            for key in ("sample_id", "stream_offset", "accepted", "reason"):
                if key not in row:
                    raise ValueError(f"decision row has no field '{key}': {sorted(row)}")
            reason_kind(str(row["reason"]))
            self._queue.put(("row", row))

    def flush(self) -> None:
        """Write everything added so far; return when it is durable."""
        self._raise_if_failed()
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(0.1):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("ShardWriter thread stopped unexpectedly")
        self._raise_if_failed()

    def close(self) -> None:
        """Flush and stop the background thread."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(("stop", None))
            self._thread.join(timeout=60)
        self._raise_if_failed()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread --

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StorageError(f"writing shards under {self.root} failed: {self._error}") from (
                self._error
            )

    def _run(self) -> None:
        buffer: list[dict] = []
        oldest = 0.0
        while True:
            timeout = None
            if buffer:
                timeout = max(0.0, oldest + self.flush_seconds - time.monotonic())
            try:
                kind, item = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, item = "timer", None
            try:
                if kind == "row":
                    if not buffer:
                        oldest = time.monotonic()
                    buffer.append(to_record(item))
                    if len(buffer) >= self.max_rows:
                        self._write(buffer)
                        buffer = []
                elif kind in ("flush", "timer", "stop"):
                    if buffer:
                        self._write(buffer)
                        buffer = []
                    if kind == "flush":
                        item.set()
                    if kind == "stop":
                        return
            except BaseException as exc:  # surfaced to the training thread by _raise_if_failed
                self._error = exc
                if kind == "flush":
                    item.set()
                if kind == "stop":
                    return

    def _write(self, records: list[dict]) -> None:
        start = min(r["stream_offset"] for r in records)
        end = max(r["stream_offset"] for r in records)
        name = f"part-r{self.rank:03d}-{start:012d}-{end:012d}.parquet"
        for decision in DECISIONS:
            part = [r for r in records if reason_kind(r["reason"]) == decision]
            if not part:
                continue
            table = pa.Table.from_pylist(part, schema=SCHEMA)
            folder = f"{self.root_path}/decision={decision}"
            final = f"{folder}/{name}"
            if self._local:
                self.fs.makedirs(folder, exist_ok=True)
                tmp = f"{folder}/_tmp-{uuid.uuid4().hex}.inprogress"
                with self.fs.open(tmp, "wb") as fh:
                    pq.write_table(table, fh, compression="zstd")
                self.fs.mv(tmp, final)
            else:
                with self.fs.open(final, "wb") as fh:
                    pq.write_table(table, fh, compression="zstd")
            self.rows_written[decision] += len(part)
            self.files_written.append(final)


# ------------------------------------------------------------------------- resume, preflight


def list_shard_files(root: str, storage_options: dict | None = None) -> list[str]:
    """Every finished shard file under a shards folder (URIs/paths as the filesystem names them)."""
    fs, path = filesystem(root, storage_options)
    # fsspec keeps one instance per storage options and s3fs caches listings in it (a path's
    # entry only: not its children's): a process that lists again while a run writes must see
    # the files written since.
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    files = []
    for decision in DECISIONS:
        folder = f"{path.rstrip('/')}/decision={decision}"
        fs.invalidate_cache(folder)
        if fs.exists(folder):
            files.extend(p for p in fs.ls(folder, detail=False)
                         if PART_NAME.match(posixpath.basename(p)))
    return sorted(files)


def drop_after(out: str, rank: int, offset: int, storage_options: dict | None = None) -> list[str]:
    """Remove rank ``rank``'s shard files that start at or after stream ``offset``.

    Called on resume with the checkpoint's offset: those rows were written after the checkpoint
    and the resumed run decides them again. Returns the removed paths.
    """
    fs, _ = filesystem(shards_root(out), storage_options)
    removed = []
    for path in list_shard_files(shards_root(out), storage_options):
        m = PART_NAME.match(posixpath.basename(path))
        if m and int(m["rank"]) == rank and int(m["start"]) >= offset:
            fs.rm(path)
            removed.append(path)
    # Leftovers of a crash mid-write are never visible to readers, but clean them up.
    _, root_path = filesystem(shards_root(out), storage_options)
    for decision in DECISIONS:
        folder = f"{root_path}/decision={decision}"
        if fs.exists(folder):
            for p in fs.ls(folder, detail=False):
                if posixpath.basename(p).startswith("_tmp-"):
                    fs.rm(p)
    return removed


def preflight_writable(out: str, storage_options: dict | None = None) -> None:
    """Write, read back and delete a probe object under ``out``; raise :class:`StorageError`.

    Run before training starts so that an unreachable bucket or a read-only folder fails in
    seconds with a clear message instead of after hours of training.
    """
    probe = f"{out.rstrip('/')}/_bsgal_write_probe-{uuid.uuid4().hex}"
    try:
        fs, path = filesystem(probe, storage_options)
        if is_local(fs):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as fh:
            fh.write(b"ok")
        with fs.open(path, "rb") as fh:
            if fh.read() != b"ok":
                raise OSError("probe object read back different bytes")
        fs.rm(path)
    except Exception as exc:  # any backend error means the same thing to the user
        hint = (
            "check the bucket name, credentials (AWS_* environment or profile) and "
            "output.storage_options.endpoint_url"
            if is_uri(out)
            else "check the folder exists or can be created and is writable"
        )
        raise StorageError(f"output {out} is not writable ({type(exc).__name__}: {exc}); "
                           f"{hint}") from None


# ----------------------------------------------------------------------------------- reading


def locate_shards(
    uri: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Find and check the shards of a run folder or of its ``shards`` folder.

    Returns the filesystem, the shards folder's path in it and the shard files (paths as the
    filesystem names them, without a protocol). Every file's schema version is checked.

    Raises:
        StorageError: the storage cannot be reached (network, credentials) or the bucket does
            not exist; the message names the URI and what to check.
        ShardSchemaError: no shards there, or a shard has another schema version.
    """
    root = uri.rstrip("/")
    try:
        fs, root_path = filesystem(root, storage_options)
        files = list_shard_files(root, storage_options)
        if not files:
            root = shards_root(uri)
            fs, root_path = filesystem(root, storage_options)
            files = list_shard_files(root, storage_options)
        if not files:
            _raise_if_missing(uri, storage_options)
    except (ShardSchemaError, StorageError):
        raise
    except Exception as exc:  # any backend error: the storage cannot be read
        raise StorageError(f"cannot read {uri} ({type(exc).__name__}: {exc}); "
                           f"{_storage_hint(uri)}") from None
    if not files:
        raise ShardSchemaError(f"{uri}: no decision shards found (expected "
                               "shards/decision=*/part-*.parquet)")
    for path in files:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        version = meta.get(SCHEMA_VERSION_KEY)
        if version not in {str(v).encode() for v in READABLE_VERSIONS}:
            found = version.decode() if version else "none"
            raise ShardSchemaError(
                f"{path}: shard schema version {found}, this bsgal reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; read it with the bsgal release "
                "that wrote it"
            )
    return fs, root_path, files


def _storage_hint(uri: str) -> str:
    if is_uri(uri):
        return ("check the bucket name, credentials (AWS_* environment or profile) and "
                "storage options (endpoint_url)")
    return "check the path"


def _raise_if_missing(uri: str, storage_options: dict | None) -> None:
    """Say precisely what is missing when a folder holds no shards (bucket, folder)."""
    fs, path = filesystem(uri, storage_options)
    if is_uri(uri):
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist or is not readable; "
                               f"{_storage_hint(uri)}")
    if not fs.exists(path):
        raise ShardSchemaError(f"{uri}: no such folder (give a run folder or its shards folder)")


def read_decisions(
    uri: str,
    columns: Sequence[str] | None = None,
    storage_options: dict | None = None,
) -> pa.Table:
    """All decision rows under a run folder or its ``shards`` folder, with a ``decision`` column.

    Raises :class:`ShardSchemaError` when there are no shards or a shard has another schema
    version, :class:`StorageError` when the storage cannot be read.
    """
    fs, root_path, files = locate_shards(uri, storage_options)
    # The current schema: version-1 files read with the newer columns null.
    schema = pa.schema([*SCHEMA, pa.field("decision", pa.string())])
    dataset = pads.dataset(files, schema=schema, filesystem=fs, format="parquet",
                           partitioning=pads.partitioning(
                               pa.schema([("decision", pa.string())]), flavor="hive"),
                           partition_base_dir=root_path)
    return dataset.to_table(columns=list(columns) if columns else None)

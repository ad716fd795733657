"""Writing decision shards: a background writer, atomic files, and the up-front write probe.

Files appear atomically: locally they are written under a hidden temporary name and renamed;
on S3 an object becomes visible only when its upload completes. A checkpoint flushes first, so
no file straddles a checkpoint; on resume, :func:`pipeline.storage.shards.drop_after` removes
the files written after the checkpoint, and the resumed run writes those candidates again
exactly once.
"""

from __future__ import annotations

import os
import posixpath
import queue
import threading
import time
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from generators.columns import reason_kind
from pipeline.storage.filesystem import StorageError, filesystem, is_local, is_uri
from pipeline.storage.shard_schema import (
    DECISIONS,
    shard_schema,
    shards_root,
    to_record,
)

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
        self.schema = shard_schema()  # with the quality checks registered now
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
        ``reason``; see :func:`pipeline.storage.shard_schema.shard_schema` for the rest)."""
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
                    buffer.append(to_record(item, self.schema))
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
            table = pa.Table.from_pylist(part, schema=self.schema)
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


def preflight_writable(out: str, storage_options: dict | None = None) -> None:
    """Write, read back and delete a probe object under ``out``; raise :class:`StorageError`.

    Run before training starts so that an unreachable bucket or a read-only folder fails in
    seconds with a clear message instead of after hours of training.
    """
    probe = f"{out.rstrip('/')}/_bsgal_write_probe-{uuid.uuid4().hex}"
    created: list[str] = []  # local folders the probe made, deepest first: removed after it
    try:
        fs, path = filesystem(probe, storage_options)
        if is_local(fs):
            folder = posixpath.dirname(path)
            while folder and not fs.exists(folder):
                created.append(folder)
                folder = posixpath.dirname(folder)
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
    finally:
        for folder in created:  # a check leaves no empty folder behind
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty: something else was put there

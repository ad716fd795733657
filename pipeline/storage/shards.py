"""Reading decision shards: listing a run's files (fresh every time), dropping those written
after a checkpoint, locating and checking them, and reading their rows.

One Parquet row per candidate that reached the trainer, on local disk or S3.

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

import posixpath
from typing import Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.storage.filesystem import StorageError, filesystem, is_local, is_uri
from pipeline.storage.shard_schema import (
    DECISIONS,
    PART_NAME,
    READABLE_VERSIONS,
    SCHEMA_VERSION_KEY,
    ShardSchemaError,
    shard_schema,
    shards_root,
)

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


# ----------------------------------------------------------------------------------- reading


def locate_shards(
    uri: str, storage_options: dict | None = None, *, skip_unreadable: bool = False,
    skipped: list[str] | None = None, can_skip: bool = False,
) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Find and check the shards of a run folder or of its ``shards`` folder.

    A file whose Parquet footer cannot be read is an error naming it and the fix (the
    ``--skip-unreadable`` flag too where the caller's command has it: ``can_skip``), or, with
    ``skip_unreadable``, left out (appended to ``skipped``).

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
    unreadable = []
    for path in files:
        try:
            meta = pq.read_schema(path, filesystem=fs).metadata or {}
        except (OSError, pa.ArrowException):
            unreadable.append(path)
            continue
        version = meta.get(SCHEMA_VERSION_KEY)
        if version not in {str(v).encode() for v in READABLE_VERSIONS}:
            found = version.decode() if version else "none"
            raise ShardSchemaError(
                f"{path}: shard schema version {found}, this bsgal reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; read it with the bsgal release "
                "that wrote it"
            )
    if unreadable and not skip_unreadable:
        shown = unreadable[0] if is_local(fs) else fs.unstrip_protocol(unreadable[0])
        raise ShardSchemaError(
            f"{shown}: not a readable Parquet file ({len(unreadable)} of the {len(files)} shard "
            "files are not: truncated or not written by bsgal); "
            + ("pass --skip-unreadable to read the others, or " if can_skip else "")
            + "move the file out of the shards folder")
    if unreadable and len(unreadable) == len(files):
        raise ShardSchemaError(f"{uri}: none of the {len(files)} shard files can be read")
    if skipped is not None:
        skipped.extend(unreadable)
    return fs, root_path, [f for f in files if f not in set(unreadable)]


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
    schema = pa.schema([*shard_schema(), pa.field("decision", pa.string())])
    dataset = pads.dataset(files, schema=schema, filesystem=fs, format="parquet",
                           partitioning=pads.partitioning(
                               pa.schema([("decision", pa.string())]), flavor="hive"),
                           partition_base_dir=root_path)
    return dataset.to_table(columns=list(columns) if columns else None)

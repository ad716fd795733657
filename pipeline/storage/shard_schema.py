"""The decision shard's contract: its schema and versions, its layout, and how a row is encoded.

Layout (hive-partitioned by decision, readable by pyarrow, pandas and DuckDB without bsgal)::

    OUT/shards/decision=accepted/part-r000-000000000000-000000000255.parquet
    OUT/shards/decision=rejected/part-r000-000000000000-000000000255.parquet
    OUT/shards/decision=invalid/part-r000-000000000256-000000000511.parquet

A file name carries the writer's rank and the range of stream offsets (the position of each
candidate in that rank's candidate stream) that its flush covered. Images are PNG bytes
(``image_png``); masks are COCO RLE (``mask_rle``: ``{size: [h, w], counts: str}``). Nothing
in a shard is pickled. The writer is :mod:`pipeline.storage.shard_writer`, the readers
:mod:`pipeline.storage.shards`.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils
from PIL import Image

from annotators.checks import check_fields
from generators.columns import DECISION_KINDS, STATUS_OK
from pipeline.errors import UserError
from pipeline.storage.row_names import COST_STAGES, cost_column

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

#: Check fields the schema has always had, in their place among the quality fields.
_BUILT_IN_CHECK_FIELDS = ("area_ratio",)

def shard_schema() -> pa.Schema:
    """The shard schema with the fields of the quality checks registered now."""
    return pa.schema(
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
            *((cost_column(stage), pa.float64()) for stage in COST_STAGES),
            ("cost_units", pa.string()),
            # 2.3
            ("prompt_option", pa.int64()),
            ("stream_position", pa.int64()),
            ("allocation_step", pa.int64()),
            # The fields of quality checks registered beyond the built-in ones
            # (annotators.checks), appended (a minor addition: readers select the columns
            # they know).
            *((name, pa.from_numpy_dtype(np.dtype(dtype)))
              for name, dtype in check_fields().items() if name not in _BUILT_IN_CHECK_FIELDS),
        ],
        metadata={SCHEMA_VERSION_KEY: str(SHARD_SCHEMA_VERSION).encode(),
                  SCHEMA_MINOR_KEY: str(SHARD_SCHEMA_MINOR).encode()},
    )


#: The schema with the checks registered when this module was imported (those of
#: annotators/checks.py); writers and readers build theirs with `shard_schema` when they start.
SCHEMA = shard_schema()


#: Float fields whose NaN means "not computed" (readers turn it into NULL); the cost columns
#: are left as written (a NaN cost is "not measured" and stays visible in sums).
def not_computed_floats(schema: pa.Schema | None = None) -> tuple[str, ...]:
    """The fields of ``schema`` (default: the one built now) where NaN means not computed."""
    schema = schema if schema is not None else shard_schema()
    return tuple(f.name for f in schema if pa.types.is_floating(f.type)
                 and not f.name.startswith("cost_"))


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


def to_record(row: dict[str, Any], schema: pa.Schema | None = None) -> dict[str, Any]:
    """A candidate row with its decision (numpy image/mask) → a shard record (PNG, RLE).

    Every field of ``schema`` (default :data:`SCHEMA`) is filled: :data:`REQUIRED_FIELDS` from the row (KeyError if
    absent), the rest from the row or a neutral value (NaN scores, empty strings, -1), never a
    guess. A mask whose shape or values cannot be encoded is recorded as absent rather than
    crashing the writer; the row keeps its reason.
    """
    record: dict[str, Any] = {}
    for f in schema if schema is not None else SCHEMA:
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

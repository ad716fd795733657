"""Column names and batch helpers of the annotation stages (see :mod:`annotators`).

Annotators must not import :mod:`generators`, so the few shared names are repeated here; both
follow CONTRACTS.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

IMAGE = "image"
CLASS_NAME = "class_name"
MASK = "mask"
ANNOTATOR = "annotator"
MASK_SCORE = "mask_score"
AREA_RATIO = "area_ratio"
NUM_COMPONENTS = "num_components"
CLIP_SCORE = "clip_score"
STATUS = "status"
ERROR = "error"

STATUS_OK = "ok"
INVALID_IMAGE = "invalid_image"
INVALID_ANNOTATION_ERROR = "invalid_annotation_error"
INVALID_MISSING_MASK = "invalid_missing_mask"
INVALID_NAN_MASK = "invalid_nan_mask"
INVALID_SIZE_MISMATCH = "invalid_size_mismatch"
INVALID_EMPTY_MASK = "invalid_empty_mask"
INVALID_AREA_RATIO = "invalid_area_ratio"
INVALID_BORDER_TOUCH = "invalid_border_touch"
INVALID_QUALITY_ERROR = "invalid_quality_error"


def string_column(values: Iterable[object]) -> np.ndarray:
    """A 1-D numpy array of Python ``str`` (object dtype)."""
    items = [str(v) for v in values]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def batch_length(batch: Mapping[str, np.ndarray]) -> int:
    """Number of rows; ValueError naming the lengths if the columns disagree."""
    lengths = {name: len(col) for name, col in batch.items()}
    if not lengths:
        return 0
    n = next(iter(lengths.values()))
    if any(v != n for v in lengths.values()):
        raise ValueError(f"batch columns differ in length: {lengths}")
    return n


def require_columns(batch: Mapping[str, np.ndarray], names: Sequence[str], stage: str) -> None:
    """KeyError naming the input columns ``stage`` needs but the batch lacks."""
    missing = [name for name in names if name not in batch]
    if missing:
        raise KeyError(
            f"{stage} needs the input column(s) {', '.join(missing)}; the batch has "
            f"{', '.join(sorted(batch)) or 'no columns'}"
        )


def incoming_status(batch: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Writable copies of ``status`` and ``error`` ("ok" / "" when the batch has none)."""
    status = string_column(batch[STATUS]) if STATUS in batch else string_column([STATUS_OK] * n)
    error = string_column(batch[ERROR]) if ERROR in batch else string_column([""] * n)
    return status, error


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask_column(masks: Sequence[np.ndarray | None], shapes: Sequence[tuple[int, int] | None]):
    """Stack per-row bool masks into [B, H, W]; rows without a mask get zeros of their shape.

    When the rows' shapes differ (a ragged batch), the column is a 1-D object array of
    H x W bool masks instead.
    """
    known = [s for s in shapes if s is not None]
    default = known[0] if known else (0, 0)
    rows = [
        np.asarray(m, dtype=bool) if m is not None else np.zeros(s or default, dtype=bool)
        for m, s in zip(masks, shapes)
    ]
    if rows and all(r.shape == rows[0].shape for r in rows):
        return np.stack(rows) if rows else np.zeros((0, 0, 0), dtype=bool)
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out

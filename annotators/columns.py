"""Column names and batch helpers of the annotation stages (see :mod:`annotators`).

The batch plumbing (``string_column``, ``batch_length``, ``require_columns``,
``incoming_status``, ``short_error``), the shared column names and the ``invalid_*`` status
values are the ones in :mod:`generators.columns` (plain numpy, no model code), re-exported here.
Both follow the candidate contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from generators.columns import (  # noqa: F401  (re-exported for the annotation stages)
    CLASS_NAME,
    ERROR,
    IMAGE,
    INVALID_ANNOTATION_ERROR,
    INVALID_AREA_RATIO,
    INVALID_BORDER_TOUCH,
    INVALID_EMPTY_MASK,
    INVALID_IMAGE,
    INVALID_MISSING_MASK,
    INVALID_NAN_MASK,
    INVALID_QUALITY_ERROR,
    INVALID_SIZE_MISMATCH,
    STATUS,
    STATUS_OK,
    batch_length,
    incoming_status,
    require_columns,
    short_error,
    string_column,
)

MASK = "mask"
ANNOTATOR = "annotator"
MASK_SCORE = "mask_score"
AREA_RATIO = "area_ratio"
NUM_COMPONENTS = "num_components"
CLIP_SCORE = "clip_score"


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

"""Candidate batches coming into the trainer, their checks, and the decision rows going out.

A candidate batch follows docs/contracts.md (Candidate): a dict of equal-length numpy columns
(Ray Data's ``batch_format="numpy"``) or, equivalently, a list of row dicts. The trainer reads
``sample_id``, ``class_id``, ``image`` (H x W x 3 uint8 RGB), ``mask`` (H x W bool) and
``status``; every other column is ignored here and kept by the caller.

The trainer does not trust upstream checks. A candidate is never scored when:

- its ``status`` is not ``"ok"``: the reason is its status (e.g. ``invalid_empty_mask`` set by
  the annotator), or ``invalid_status`` when the status is not an ``invalid_*`` string;
- its class is not a category of the training set: ``invalid_unknown_class``;
- its image is not H x W x 3 uint8: ``invalid_image``;
- its mask is not H x W like its image: ``invalid_size_mismatch``;
- its mask holds NaN (a float mask): ``invalid_nan_mask``;
- its mask has fewer than ``min_mask_pixels`` pixels: ``invalid_empty_mask``;
- its mask covers the whole image (nothing was cut out): ``invalid_full_mask``.

Such a candidate gets its decision row at once and the step goes on without it. Batch-level
reasons come from `selector.decision` (``invalid_empty_batch``, ``invalid_nan_candidate_grad``,
...), plus ``invalid_nan_loss`` here: the generated part of the loss was not finite. The status
values that the stages set too, and `generators.columns.reason_kind` (accepted / rejected /
invalid of any reason), are those of :mod:`generators.columns`; the ones defined here are the
trainer's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generators.columns import (
    INVALID_EMPTY_MASK,
    INVALID_IMAGE,
    INVALID_NAN_MASK,
    INVALID_SIZE_MISMATCH,
    INVALID_UNKNOWN_CLASS,
    STATUS_OK,
    is_invalid_reason,
)

INVALID_STATUS = "invalid_status"
INVALID_FULL_MASK = "invalid_full_mask"
INVALID_NAN_LOSS = "invalid_nan_loss"

REQUIRED_COLUMNS = ("sample_id", "class_id", "image", "mask", "status")

DECISION_FIELDS = ("sample_id", "stream_offset", "score", "threshold", "accepted", "reason",
                   "step", "rank", "cache_norm", "batch_id", "method")


@dataclass(frozen=True)
class Candidate:
    """A checked generated instance, cut to its mask's bounding box.

    Attributes:
        position: index of the row in the incoming batch.
        sample_id: the candidate's id.
        class_id: LVIS category id. label: contiguous training label (1..K).
        rgb: h x w x 3 uint8, the mask's bounding box of the image.
        mask: h x w bool, True on the object.
        fields: the row's numeric scalar columns (``mask_score``, ``clip_score``, ...) for
            field-threshold baselines.
    """

    position: int
    sample_id: str
    class_id: int
    label: int
    rgb: np.ndarray
    mask: np.ndarray
    fields: dict[str, float] = field(default_factory=dict)


def batch_rows(batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A candidate batch (dict of columns or list of rows) as a list of row dicts.

    Raises ValueError naming a missing column or columns of unequal length.
    """
    if isinstance(batch, Mapping):
        missing = [c for c in REQUIRED_COLUMNS if c not in batch]
        if missing:
            raise ValueError(f"candidate batch lacks column(s) {missing}; a batch needs "
                             f"{list(REQUIRED_COLUMNS)} (docs/contracts.md)")
        lengths = {k: len(v) for k, v in batch.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"candidate batch columns have different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        return [{k: v[i] for k, v in batch.items()} for i in range(n)]
    rows = [dict(r) for r in batch]
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"candidate row {i} lacks field(s) {missing}; a row needs "
                             f"{list(REQUIRED_COLUMNS)} (docs/contracts.md)")
    return rows


def check_candidate(row: Mapping[str, Any], label_of: Mapping[int, int],
                    min_mask_pixels: int = 16) -> str | None:
    """The ``invalid_*`` reason for a row (module docstring), or None when it can be pasted."""
    status = str(row["status"])
    if status != STATUS_OK:
        return status if is_invalid_reason(status) else INVALID_STATUS
    if int(row["class_id"]) not in label_of:
        return INVALID_UNKNOWN_CLASS
    image = np.asarray(row["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        return INVALID_IMAGE
    mask = np.asarray(row["mask"])
    if mask.shape != image.shape[:2]:
        return INVALID_SIZE_MISMATCH
    if mask.dtype.kind == "f" and np.isnan(mask).any():
        return INVALID_NAN_MASK
    pixels = int(np.count_nonzero(mask))
    if pixels < min_mask_pixels:
        return INVALID_EMPTY_MASK
    if pixels == mask.size:
        return INVALID_FULL_MASK
    return None


def cut_out(position: int, row: Mapping[str, Any], label: int) -> Candidate:
    """The candidate cut to its mask's bounding box (row must have passed `check_candidate`)."""
    mask = np.asarray(row["mask"]).astype(bool)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    image = np.asarray(row["image"])
    return Candidate(position=position, sample_id=str(row["sample_id"]),
                     class_id=int(row["class_id"]), label=label,
                     rgb=np.ascontiguousarray(image[y0:y1, x0:x1]),
                     mask=np.ascontiguousarray(mask[y0:y1, x0:x1]),
                     fields=numeric_fields(row))


def numeric_fields(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's numeric scalar columns (``mask_score``, ``clip_score``, ...), the fields the
    quality gates and field thresholds read (``class_id`` and ``seed`` left out)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("class_id", "seed") and isinstance(v, (int, float, np.integer,
                                                                np.floating))
            and not isinstance(v, (bool, np.bool_))}


def nan_if_none(value: float | None) -> float:
    """``value`` as a float, NaN for None (a number that was not computed)."""
    return math.nan if value is None else float(value)


def decision_record(sample_id: str, *, reason: str, accepted: bool, step: int, rank: int,
                    method: str, stream_offset: int, batch_id: str = "",
                    score: float | None = None, threshold: float | None = None,
                    cache_norm: float | None = None) -> dict[str, Any]:
    """One decision row (docs/contracts.md, "Decision"); missing numbers become NaN.

    ``stream_offset`` is the candidate's position in this worker's candidate stream (0-based,
    over all batches), the key a resumed run skips by.
    """
    return {
        "sample_id": str(sample_id),
        "stream_offset": int(stream_offset),
        "score": nan_if_none(score),
        "threshold": nan_if_none(threshold),
        "accepted": bool(accepted),
        "reason": str(reason),
        "step": int(step),
        "rank": int(rank),
        "cache_norm": nan_if_none(cache_norm),
        "batch_id": str(batch_id),
        "method": str(method),
    }

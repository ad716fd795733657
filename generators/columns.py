"""Column names, status values and small helpers for candidate batches (dicts of equal-length
numpy columns).

The vocabulary is listed in :mod:`generators` and :mod:`annotators` (the package docstrings);
this module holds the names as constants and the plain helpers every stage uses to read and write
a batch. It is the lowest module of the candidate contract: :mod:`annotators.columns` re-exports
it and `trainer.candidates` imports it (plain numpy, no model code), so the candidate status
values and the reason vocabulary of decision rows (`reason_kind`) are written down only here.
The batch selector's own decision reasons stay in `selector.decision` (selector imports nothing
from the project); they follow the same ``accepted`` / ``rejected_*`` / ``invalid_*`` forms.
It also holds the lazy re-export that the `generators` and `annotators` packages share
(`lazy_attribute`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SAMPLE_ID = "sample_id"
CLASS_ID = "class_id"
CLASS_NAME = "class_name"
PROMPT = "prompt"
#: Which of its class's prompt options (templates, then extra prompts) a row was drawn with.
PROMPT_OPTION = "prompt_option"
#: The prompt stream position of a row (its draw: class, prompt option, seed).
STREAM_POSITION = "stream_position"
#: The trainer step whose decisions the row's class and prompt were allocated from (-1: none,
#: open loop).
ALLOCATION_STEP = "allocation_step"
SEED = "seed"
GENERATOR = "generator"
IMAGE = "image"
TRUTH_FAILURE = "truth_failure"
TRUTH_CLASS_ID = "truth_class_id"
TRUTH_MASK = "truth_mask"
STATUS = "status"
ERROR = "error"

STATUS_OK = "ok"
# Generation failures.
INVALID_GENERATION_ERROR = "invalid_generation_error"
INVALID_UNKNOWN_CLASS = "invalid_unknown_class"
INVALID_NSFW = "invalid_nsfw"
# Pool-source failures (generation.backend: pool): the entry's file is not there, or it is
# there but is not what its form promises (not an image, no alpha, sizes differ).
INVALID_POOL_MISSING = "invalid_pool_missing"
INVALID_POOL_ENTRY = "invalid_pool_entry"
# Annotation and quality-check failures (the trainer checks some of them again).
INVALID_IMAGE = "invalid_image"
INVALID_ANNOTATION_ERROR = "invalid_annotation_error"
INVALID_MISSING_MASK = "invalid_missing_mask"
INVALID_NAN_MASK = "invalid_nan_mask"
INVALID_SIZE_MISMATCH = "invalid_size_mismatch"
INVALID_EMPTY_MASK = "invalid_empty_mask"
INVALID_AREA_RATIO = "invalid_area_ratio"
INVALID_BORDER_TOUCH = "invalid_border_touch"
INVALID_QUALITY_ERROR = "invalid_quality_error"

#: The reason of a decision row is ``accepted``, ``rejected_<why>`` or ``invalid_<why>`` (a
#: candidate's failed status, or a batch that could not be judged).
ACCEPTED = "accepted"
REJECTED_PREFIX = "rejected_"
INVALID_PREFIX = "invalid_"
#: What `reason_kind` returns (the ``decision`` column of the decision shards).
DECISION_KINDS = ("accepted", "rejected", "invalid")

#: Columns every prompt row carries (the input rows of the Ray graph).
PROMPT_COLUMNS = (SAMPLE_ID, CLASS_ID, CLASS_NAME, PROMPT, PROMPT_OPTION, SEED)
#: Provenance of a candidate drawn from a pool (empty for online candidates): the pool's URI
#: and the entry's own id there (X-Paste entry as written, or the earlier sample id).
SOURCE = "source"
SOURCE_ID = "source_id"


def string_column(values: Iterable[object]) -> np.ndarray:
    """A 1-D numpy array of Python ``str`` (object dtype), as Ray Data's numpy format carries."""
    items = [str(v) for v in values]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def batch_length(batch: Mapping[str, np.ndarray]) -> int:
    """Number of rows of a batch; every column must have it (ValueError naming the culprit)."""
    lengths = {name: len(col) for name, col in batch.items()}
    if not lengths:
        return 0
    n = next(iter(lengths.values()))
    odd = {k: v for k, v in lengths.items() if v != n}
    if odd:
        raise ValueError(f"batch columns differ in length: {lengths}")
    return n


def require_columns(batch: Mapping[str, np.ndarray], names: Sequence[str], stage: str) -> None:
    """Raise a KeyError naming the missing input columns of ``stage``."""
    missing = [name for name in names if name not in batch]
    if missing:
        raise KeyError(
            f"{stage} needs the input column(s) {', '.join(missing)}; the batch has "
            f"{', '.join(sorted(batch)) or 'no columns'} (rows come from PromptSampler)"
        )


def incoming_status(batch: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Writable copies of the ``status`` and ``error`` columns ("ok" / "" when absent)."""
    status = string_column(batch[STATUS]) if STATUS in batch else string_column([STATUS_OK] * n)
    error = string_column(batch[ERROR]) if ERROR in batch else string_column([""] * n)
    return status, error


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, cut to ``limit`` characters, for the ``error`` column."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_invalid_reason(reason: str) -> bool:
    """True for an ``invalid_<why>`` status or reason."""
    return reason.startswith(INVALID_PREFIX)


def reason_kind(reason: str) -> str:
    """``"accepted"``, ``"rejected"`` (``rejected_*``) or ``"invalid"`` (``invalid_*``) for a
    decision reason; ValueError for any other string."""
    if reason == ACCEPTED:
        return "accepted"
    if reason.startswith(REJECTED_PREFIX):
        return "rejected"
    if is_invalid_reason(reason):
        return "invalid"
    raise ValueError(f"reason {reason!r} is not {ACCEPTED!r}, '{REJECTED_PREFIX}*' or "
                     f"'{INVALID_PREFIX}*'")


def lazy_attribute(package: str, lazy: Mapping[str, str], name: str):
    """A package's lazy re-export (its module ``__getattr__``): attribute ``name`` of the
    module that ``lazy`` maps it to, imported on first use so the package itself stays cheap."""
    if name in lazy:
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

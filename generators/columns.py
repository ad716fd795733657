"""Column names and small helpers for candidate batches (dicts of equal-length numpy columns).

The vocabulary is listed in :mod:`generators` (the package docstring); this module holds the
names as constants and the helpers every generator stage uses to read and write a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SAMPLE_ID = "sample_id"
CLASS_ID = "class_id"
CLASS_NAME = "class_name"
PROMPT = "prompt"
SEED = "seed"
GENERATOR = "generator"
IMAGE = "image"
TRUTH_FAILURE = "truth_failure"
TRUTH_CLASS_ID = "truth_class_id"
TRUTH_MASK = "truth_mask"
STATUS = "status"
ERROR = "error"

STATUS_OK = "ok"
INVALID_GENERATION_ERROR = "invalid_generation_error"
INVALID_UNKNOWN_CLASS = "invalid_unknown_class"
INVALID_NSFW = "invalid_nsfw"

#: Columns every prompt row carries (the input rows of the Ray graph).
PROMPT_COLUMNS = (SAMPLE_ID, CLASS_ID, CLASS_NAME, PROMPT, SEED)


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

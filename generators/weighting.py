"""How often each class is prompted: uniform, rare-boost, inverse frequency, or external weights.

All functions return one non-negative float64 weight per class of a vocabulary, in vocabulary
order (not normalised). The prompt sampler normalises them into sampling probabilities.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from generators.vocabulary import ClassVocabulary

WEIGHTINGS = ("uniform", "rare_boost", "inverse_frequency", "external")
#: Reference-style rare boost: rare classes prompted 4x as often as frequent ones.
DEFAULT_GROUP_WEIGHTS = {"r": 4.0, "c": 2.0, "f": 1.0}


def check_weights(weights: np.ndarray, what: str) -> np.ndarray:
    """Float64 copy of ``weights``; ValueError if any is negative or not finite, or all are 0."""
    w = np.asarray(weights, dtype=np.float64).copy()
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        raise ValueError(f"{what}: weights must be finite and >= 0, got {w[bad][:5].tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"{what}: every class has weight 0; at least one must be > 0")
    return w


def group_weights(
    vocab: ClassVocabulary, weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """Weight of each class by its LVIS frequency group (``rare_boost``)."""
    table = dict(DEFAULT_GROUP_WEIGHTS if weights is None else weights)
    out = np.empty(len(vocab), dtype=np.float64)
    for i, c in enumerate(vocab):
        if c.frequency not in table:
            raise ValueError(
                f"rare_boost weighting: class {c.name!r} has frequency group {c.frequency!r}, "
                f"which has no weight in group_weights={table}; give a weight for it or use "
                "weighting='uniform'"
            )
        out[i] = float(table[c.frequency])
    return out


def inverse_frequency_weights(vocab: ClassVocabulary) -> np.ndarray:
    """``1 / image_count`` per class (a class with 0 images counts as 1)."""
    missing = [c.name for c in vocab if c.image_count is None]
    if missing:
        raise ValueError(
            f"inverse_frequency weighting needs 'image_count' for every class; missing for "
            f"{', '.join(missing[:10])}; load the vocabulary from the dataset's training JSON"
        )
    return np.array([1.0 / max(int(c.image_count), 1) for c in vocab], dtype=np.float64)


def load_external_weights(source: str | Path | Mapping) -> dict[str, float]:
    """A ``{class name or id: weight}`` mapping from a dict or a JSON file."""
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"external class weights file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"external class weights file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"external class weights file {path} must hold a JSON object "
            '{"class name or id": weight, ...}, got ' + type(data).__name__
        )
    return {str(k): v for k, v in data.items()}


def mapped_weights(
    vocab: ClassVocabulary,
    weights: Mapping[str | int, float] | Sequence[float] | np.ndarray,
    missing: float = 0.0,
    what: str = "class weights",
) -> np.ndarray:
    """Weights given per class name/id (classes not named get ``missing``) or as a full array."""
    if isinstance(weights, Mapping):
        out = np.full(len(vocab), float(missing), dtype=np.float64)
        for key, value in weights.items():
            i = vocab.index_of(key)  # UnknownClassError names the class and lists valid ones
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                raise ValueError(f"{what}: weight of {key!r} must be a number, got {value!r}")
            out[i] = float(value)
        return out
    arr = np.asarray(weights, dtype=np.float64)
    if arr.shape != (len(vocab),):
        raise ValueError(
            f"{what}: expected {len(vocab)} weights (one per class, vocabulary order), "
            f"got shape {arr.shape}"
        )
    return arr.copy()


def class_weights(
    vocab: ClassVocabulary,
    weighting: str = "rare_boost",
    group_weights_table: Mapping[str, float] | None = None,
    external: str | Path | Mapping | None = None,
) -> np.ndarray:
    """One weight per class for a weighting scheme (one of :data:`WEIGHTINGS`)."""
    if weighting == "uniform":
        w = np.ones(len(vocab), dtype=np.float64)
    elif weighting == "rare_boost":
        w = group_weights(vocab, group_weights_table)
    elif weighting == "inverse_frequency":
        w = inverse_frequency_weights(vocab)
    elif weighting == "external":
        if external is None:
            raise ValueError(
                "weighting='external' needs external weights: a JSON file or dict "
                '{"class name or id": weight}'
            )
        w = mapped_weights(vocab, load_external_weights(external), what="external weights")
    else:
        raise ValueError(f"unknown class weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"{weighting} weighting produced non-finite weights")
    return w

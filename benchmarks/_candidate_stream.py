"""Candidate streams for the selection-quality benchmark, and how acceptance compares with truth.

A stream is made by the embedded pipeline's own stages, in plain Python: `PromptSampler`
(rare-boost class weighting) → `ProceduralGenerator` (known failure rates) → `BuiltinAnnotator`
→ `QualityCheck` (X-Paste defaults). It is a dict of equal-length numpy columns
(docs/contracts.md), ``image`` uint8 [N, S, S, 3], ``mask`` bool [N, S, S], ``truth_failure`` str
("none" = a good sample), ``mask_score`` float32 in [0, 1], ``status`` str, ...; it is written
once per seed (`save_stream`) and every method of that seed reads the same file, so all methods
see identical candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: 40 % of the samples fail, 10 % of each kind (the generator's ``truth_failure``).
FAILURE_RATES = {"wrong_class": 0.1, "broken": 0.1, "clutter": 0.1, "noise": 0.1}
GOOD = "none"
#: Columns kept on disk (the rest of the pipeline's columns are not needed here).
STREAM_COLUMNS = ("sample_id", "class_id", "image", "mask", "status", "mask_score",
                  "area_ratio", "truth_failure", "truth_class_id")


def real_cutouts(ds: Any, count: int, *, seed: int = 0, prefix: str = "c", size: int = 96,
                 wrong_fraction: float = 0.0, mask_scores: bool = False
                 ) -> list[dict[str, Any]]:
    """Candidates cut from real instances of ``ds`` (an ``LvisDataset``), centred on a white
    ``size`` px canvas: rows with ``sample_id``, ``class_id``, ``image`` (HxWx3 uint8),
    ``mask`` (HxW bool), ``status``.

    ``wrong_fraction`` of them get another class than the one drawn (a semantic failure);
    ``mask_scores`` adds a random ``mask_score`` in [0.2, 1) for field-threshold tests.
    """
    rng = np.random.default_rng(seed)
    cat_ids = [c.id for c in ds.categories]
    rows: list[dict[str, Any]] = []
    while len(rows) < count:
        sample = ds[int(rng.integers(len(ds)))]
        if not len(sample["labels"]):
            continue
        k = int(rng.integers(len(sample["labels"])))
        ys, xs = np.nonzero(sample["masks"][k])
        if len(ys) < 30:
            continue
        crop = sample["masks"][k][ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        rgb = sample["image"][ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = crop.shape
        if h >= size or w >= size:
            continue
        image = np.full((size, size, 3), 255, np.uint8)
        mask = np.zeros((size, size), bool)
        y0, x0 = (size - h) // 2, (size - w) // 2
        image[y0:y0 + h, x0:x0 + w][crop] = rgb[crop]
        mask[y0:y0 + h, x0:x0 + w] = crop
        class_id = int(sample["category_ids"][k])
        if wrong_fraction and rng.random() < wrong_fraction:
            class_id = int(rng.choice([c for c in cat_ids if c != class_id]))
        row = {"sample_id": f"{prefix}{len(rows)}", "class_id": class_id, "image": image,
               "mask": mask, "status": "ok"}
        if mask_scores:
            row["mask_score"] = np.float32(rng.uniform(0.2, 1.0))
        rows.append(row)
    return rows


def make_candidate_stream(lvis_json: str | Path, count: int, *, seed: int, run_id: str,
                          failure_rates: Mapping[str, float] | None = None,
                          image_size: int = 128, chunk: int = 256) -> dict[str, np.ndarray]:
    """``count`` annotated, quality-checked candidates of the built-in generator.

    Args:
        lvis_json: the built-in set's training JSON (class vocabulary, looks, frequency groups).
        count: number of candidates (stream positions 0..count-1).
        seed, run_id: fix the prompt stream (and with it every image).
        failure_rates: the generator's failure rates (default `FAILURE_RATES`).
        image_size: side of the generated images in pixels.

    Returns:
        The stream as numpy columns (`STREAM_COLUMNS`).
    """
    from annotators import QualityCheck, build_annotator
    from generators import PromptSampler, build_generator

    generator = build_generator("procedural", lvis_json=lvis_json, image_size=image_size,
                                failure_rates=dict(failure_rates or FAILURE_RATES))
    sampler = PromptSampler.from_lvis_json(lvis_json, run_id=run_id, seed=seed,
                                           weighting="rare_boost", generator=generator.version)
    annotator = build_annotator("builtin")
    quality = QualityCheck()
    parts = []
    for start in range(0, count, chunk):
        batch = sampler.sample_batch(min(chunk, count - start), start)
        batch = quality(annotator(generator(batch)))
        parts.append({k: np.asarray(batch[k]) for k in STREAM_COLUMNS})
    return concat_streams(parts)


def concat_streams(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row-wise concatenation of streams with the same columns."""
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def take(stream: Mapping[str, np.ndarray], rows: np.ndarray | Sequence[int] | slice
         ) -> dict[str, np.ndarray]:
    """The stream restricted to ``rows`` (an index array, boolean mask or slice)."""
    return {k: np.asarray(v)[rows] for k, v in stream.items()}


def stream_length(stream: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(stream.values())))


def good_only(stream: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The candidates the generator drew correctly (``truth_failure == "none"``)."""
    return take(stream, np.asarray(stream["truth_failure"]) == GOOD)


def batches(stream: Mapping[str, np.ndarray], size: int) -> Iterable[dict[str, np.ndarray]]:
    """Consecutive candidate batches of ``size`` rows (the last one may be shorter)."""
    n = stream_length(stream)
    for start in range(0, n, size):
        yield take(stream, slice(start, start + size))


def save_stream(path: str | Path, stream: Mapping[str, np.ndarray]) -> None:
    """Write the stream as an uncompressed ``.npz`` (strings as unicode arrays, no pickle)."""
    arrays = {k: (np.asarray(v).astype(str) if np.asarray(v).dtype == object else np.asarray(v))
              for k, v in stream.items()}
    tmp = Path(f"{path}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_stream(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def add_object_noise(stream: Mapping[str, np.ndarray], sigma: float, *, seed: int
                     ) -> dict[str, np.ndarray]:
    """The same candidates with Gaussian pixel noise on the object.

    Noise of standard deviation ``sigma * 255`` (uint8 levels) is added to every pixel under
    the candidate's mask, then clipped to [0, 255]; masks, classes and everything else stay as
    they are (the cut-out only uses the masked pixels). ``sigma = 0`` returns the images
    unchanged. The noise of row ``i`` depends on (``seed``, ``i``) only, not on ``sigma``'s
    other values, so levels differ only in amplitude.
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    out = dict(stream)
    images = np.asarray(stream["image"])
    if sigma == 0:
        return out
    masks = np.asarray(stream["mask"]).astype(bool)
    noisy = images.astype(np.float32)
    for i in range(len(images)):
        unit = np.random.default_rng([int(seed), i]).standard_normal(images.shape[1:])
        noisy[i] += (sigma * 255.0 * unit * masks[i][..., None]).astype(np.float32)
    out["image"] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC that a positive scores above a negative (ties count half); NaN if either set is
    empty."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if not len(positive) or not len(negative):
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def acceptance_against_truth(decisions: Sequence[Mapping[str, Any]],
                             truth_failure: Mapping[str, str]) -> dict[str, float]:
    """Precision and recall of acceptance, candidate by candidate, against the generator's truth.

    Args:
        decisions: one row per consumed candidate with ``sample_id`` and ``accepted``
            (invalid candidates count as not accepted).
        truth_failure: ``sample_id`` → the generator's ``truth_failure``.

    Returns:
        ``candidates``, ``good`` (good candidates among them), ``accepted``,
        ``accepted_fraction``, ``precision`` = good accepted / accepted (NaN if none accepted),
        ``recall`` = good accepted / good (NaN if no good candidate), ``good_fraction``.
    """
    accepted = np.array([bool(d["accepted"]) for d in decisions], dtype=bool)
    kinds = np.array([truth_failure[str(d["sample_id"])] for d in decisions], dtype=object)
    good = kinds == GOOD
    n, n_acc, n_good = len(decisions), int(accepted.sum()), int(good.sum())
    hit = int((accepted & good).sum())
    scores = np.array([float(d.get("score", np.nan)) for d in decisions], dtype=float)
    finite = np.isfinite(scores)
    reasons = np.array([str(d.get("reason", "")) for d in decisions], dtype=object)
    judged = (reasons == "accepted") | (reasons == "rejected_score")  # reached the threshold
    rejected_score = reasons == "rejected_score"
    steps = np.array([int(d.get("step", 0)) for d in decisions], dtype=np.int64)
    halves = {}
    if judged.any():
        middle = np.median(steps[judged])
        for name, part in (("first_half", steps <= middle), ("second_half", steps > middle)):
            mine = judged & part
            halves[name] = float(accepted[mine].mean()) if mine.any() else float("nan")
    by_kind = {}
    for kind in (GOOD, *FAILURE_RATES):
        mine = kinds == kind
        by_kind[kind] = {
            "candidates": int(mine.sum()),
            "accepted_fraction": float(accepted[mine].mean()) if mine.any() else float("nan"),
            # of this kind's candidates that reached the threshold, the share it rejected
            "rejected_by_threshold": (float(rejected_score[mine & judged].mean())
                                      if (mine & judged).any() else float("nan")),
            # ROC AUC of the decision score, good vs this kind, among candidates with a score
            "score_auc": (roc_auc(scores[good & finite], scores[mine & finite])
                          if kind != GOOD else float("nan")),
        }
    return {
        "by_kind": by_kind,
        "candidates": n,
        "good": n_good,
        "accepted": n_acc,
        "accepted_fraction": n_acc / n if n else float("nan"),
        "good_fraction": n_good / n if n else float("nan"),
        "precision": hit / n_acc if n_acc else float("nan"),
        "recall": hit / n_good if n_good else float("nan"),
        # of the candidates that reached the threshold, the share kept (all, and per half of
        # the run's steps: a threshold whose kept share drifts shows it here)
        "kept_of_judged": float(accepted[judged].mean()) if judged.any() else float("nan"),
        "kept_of_judged_halves": halves,
    }

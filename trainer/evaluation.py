"""LVIS evaluation (AP, AP50, AP75, APr, APc, APf for bbox and segm) with the official package.

Two ways in:

- :func:`evaluate_lvis` takes ground truth (path, URI or dict) and detections in the LVIS results
  format (list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
  "segmentation": RLE}``) and returns the metrics;
- :class:`LvisEvaluator` follows detectron2's ``reset / process / evaluate`` life cycle for a
  model's per-image predictions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from lvis import LVIS, LVISEval, LVISResults

from trainer.datasets.lvis_format import load_lvis_json, read_json, validate_lvis_json

METRICS = ("AP", "AP50", "AP75", "APr", "APc", "APf")
IOU_TYPES = ("bbox", "segm")


@contextlib.contextmanager
def _lvis_numpy2_compat() -> Iterator[None]:
    """Let lvis 0.5.3 run on numpy >= 2 for the duration of one evaluation.

    ``lvis/eval.py`` (``LVISEval.accumulate``) still calls ``astype(dtype=np.float)``; the alias
    was removed in numpy 2.0. We provide it only while the evaluator runs and remove it after,
    so nothing else in the process sees a resurrected alias. Drop this when lvis is fixed.
    """
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


class _LvisFromDict(LVIS):
    """The official ``LVIS`` API over an already-loaded (and validated) annotation dict."""

    def __init__(self, dataset: dict) -> None:
        self._preloaded = dataset
        super().__init__("<in-memory>")

    def _load_json(self, path: str) -> dict:
        return self._preloaded


def _as_lvis(gt: str | dict | LVIS, storage_options: dict | None) -> LVIS:
    if isinstance(gt, LVIS):
        return gt
    if isinstance(gt, dict):
        validate_lvis_json(gt, "<ground truth dict>")
        return _LvisFromDict(gt)
    return _LvisFromDict(load_lvis_json(str(gt), storage_options))


_JSON_TYPES = {dict: "a JSON object", str: "a JSON string", int: "a JSON number",
               float: "a JSON number", bool: "a JSON boolean", type(None): "JSON null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_detections(dets: Any, gt: LVIS, source: str) -> list[dict]:
    if not isinstance(dets, (list, tuple)):
        raise ValueError(
            f"{source}: the file must hold a JSON list of detections ([{{\"image_id\", "
            f"\"category_id\", \"bbox\", \"score\", \"segmentation\"}}, ...], LVIS results "
            f"format), not {_json_type(dets)}")
    dets = list(dets)
    cats, imgs = set(gt.get_cat_ids()), set(gt.get_img_ids())
    for i, det in enumerate(dets):
        if not isinstance(det, dict):
            raise ValueError(f"{source}: detection #{i} is {_json_type(det)}, not an object "
                             "with image_id, category_id, bbox, score (and segmentation)")
        for key in ("image_id", "category_id", "score"):
            if key not in det:
                raise ValueError(f"{source}: detection #{i} has no field '{key}'")
        if "bbox" not in det and "segmentation" not in det:
            raise ValueError(f"{source}: detection #{i} has neither 'bbox' nor 'segmentation'")
        if det["category_id"] not in cats:
            raise ValueError(
                f"{source}: detection #{i} category_id={det['category_id']} is not a category "
                "of the ground truth"
            )
        if det["image_id"] not in imgs:
            raise ValueError(
                f"{source}: detection #{i} image_id={det['image_id']} is not an image of the "
                "ground truth"
            )
    return dets


def _without_segmentation(dets: Sequence[dict]) -> list[int]:
    return [i for i, d in enumerate(dets) if "segmentation" not in d]


def iou_types_for(dets: Sequence[dict]) -> tuple[tuple[str, ...], dict[str, str]]:
    """What the detections can be evaluated on: bbox always (a box, or the mask's box), segm
    only when every detection has a ``segmentation``; and why each other type is left out."""
    missing = _without_segmentation(dets)
    if not missing:
        return IOU_TYPES, {}
    return ("bbox",), {"segm": f"{len(missing)} of {len(dets)} detections have no "
                               "'segmentation' (box-only results)"}


def evaluate_lvis(
    gt: str | dict | LVIS,
    detections: str | Sequence[dict],
    iou_types: Sequence[str] | None = None,
    max_dets: int = 300,
    storage_options: dict | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run the official LVIS evaluation.

    Args:
        gt: LVIS-format ground truth: a path/URI, a loaded dict, or an ``lvis.LVIS``.
        detections: a results path/URI or list of result dicts (LVIS results format).
        iou_types: any of ``"bbox"``, ``"segm"``; segm needs a ``segmentation`` RLE in every
            detection (otherwise ``ValueError``). None (default): what the detections hold
            (:func:`iou_types_for`).
        max_dets: detections kept per image (LVIS: 300).
        on_skip: with ``iou_types=None``, called as ``on_skip(iou_type, why)`` for each type
            left out (default: a logged warning).

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APr", "APc", "APf", ...}}`` with values in [0, 1];
        -1 where a group has no ground truth (LVIS's convention). No detections gives 0.
    """
    lvis_gt = _as_lvis(gt, storage_options)
    source = detections if isinstance(detections, str) else "<detections>"
    dets = read_json(detections, storage_options) if isinstance(detections, str) else detections
    dets = _check_detections(dets, lvis_gt, str(source))
    if iou_types is None:
        iou_types, skipped = iou_types_for(dets)
        for iou_type, why in skipped.items():
            if on_skip is not None:
                on_skip(iou_type, why)
            else:
                logging.getLogger(__name__).warning("%s: %s evaluation skipped: %s", source,
                                                    iou_type, why)
    results: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type {iou_type!r} is not one of {IOU_TYPES}")
        missing = _without_segmentation(dets) if iou_type == "segm" else []
        if missing:
            raise ValueError(
                f"{source}: segm evaluation (--iou-type segm) needs a 'segmentation' (RLE) in "
                f"every detection; {len(missing)} of {len(dets)} have none (the first is "
                f"detection #{missing[0]}): box-only results can be evaluated on bbox only")
        if not dets:
            results[iou_type] = _empty_metrics(lvis_gt)
            continue
        # LVISResults mutates the dicts it is given (ids, areas); keep the caller's intact.
        with _quiet_lvis_logs(), _lvis_numpy2_compat():
            lvis_dt = LVISResults(lvis_gt, _with_boxes(copy.deepcopy(dets)), max_dets=max_dets)
            evaluator = LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
            evaluator.params.max_dets = max_dets
            evaluator.run()
        results[iou_type] = {k: float(v) for k, v in evaluator.get_results().items()}
    return results


def _with_boxes(dets: list[dict]) -> list[dict]:
    """Give a mask-only detection its mask's box (LVISResults does so only when the first
    detection has no box, and fails on a later one without)."""
    for d in dets:
        if "bbox" not in d:
            d["bbox"] = [float(v) for v in mask_utils.toBbox(d["segmentation"])]
    return dets


def _empty_metrics(lvis_gt: LVIS) -> dict[str, float]:
    groups = {c["frequency"] for c in lvis_gt.dataset["categories"]
              if lvis_gt.cat_img_map.get(c["id"])}
    out = {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    for g, key in (("r", "APr"), ("c", "APc"), ("f", "APf")):
        out[key] = 0.0 if g in groups else -1.0
    return out


@contextlib.contextmanager
def _quiet_lvis_logs() -> Iterator[None]:
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def encode_mask(mask: np.ndarray) -> dict:
    """H x W bool mask → compressed COCO RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class LvisEvaluator:
    """Collects per-image predictions and evaluates them against an LVIS-format split.

    Args:
        gt: the split's annotation dict (e.g. ``LvisDataset.subset(...)``).
        label_to_category: contiguous model label (1..K) → LVIS category id.
    """

    def __init__(self, gt: dict, label_to_category: dict[int, int]) -> None:
        validate_lvis_json(gt, "<evaluation ground truth>")
        self.gt = gt
        self.label_to_category = dict(label_to_category)
        self.reset()

    def reset(self) -> None:
        self.detections: list[dict] = []

    def process(
        self,
        image_id: int,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        masks: np.ndarray | None = None,
    ) -> None:
        """Add one image's predictions.

        Args:
            boxes: N x 4 XYXY pixels in the ground truth image's frame.
            scores: N confidences in [0, 1].
            labels: N contiguous labels (1..K).
            masks: N x H x W bool (or probabilities, thresholded at 0.5), or None for bbox only.
        """
        for i in range(len(scores)):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            det = {
                "image_id": int(image_id),
                "category_id": int(self.label_to_category[int(labels[i])]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[i]),
            }
            if masks is not None:
                det["segmentation"] = encode_mask(np.asarray(masks[i]) >= 0.5)
            self.detections.append(det)

    def evaluate(self, iou_types: Sequence[str] = IOU_TYPES) -> dict[str, dict[str, float]]:
        types = [t for t in iou_types if t != "segm" or all("segmentation" in d
                                                            for d in self.detections)]
        return evaluate_lvis(self.gt, self.detections, iou_types=types)

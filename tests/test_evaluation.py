"""LVIS evaluation through the official lvis package."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from trainer.datasets import LvisDataset
from trainer.evaluation import LvisEvaluator, evaluate_lvis


def _gt_as_detections(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 1.0, "segmentation": a["segmentation"]}
        for a in gt["annotations"]
    ]


def test_perfect_detections_score_one_and_shuffled_labels_score_lower(builtin_data: Path) -> None:
    gt_path = builtin_data / "val.json"
    gt = json.loads(gt_path.read_text())
    perfect = evaluate_lvis(str(gt_path), _gt_as_detections(gt))
    # 240 training images: no class is in more than 100 of them, so none is frequent.
    assert {c["frequency"] for c in gt["categories"]} == {"r", "c"}
    for iou_type in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "APr", "APc"):
            assert perfect[iou_type][metric] == pytest.approx(1.0), (iou_type, metric)
        assert perfect[iou_type]["APf"] == -1.0  # LVIS's value for a group without classes
    rng = random.Random(0)
    cats = [c["id"] for c in gt["categories"]]
    shuffled = [dict(d, category_id=rng.choice(cats)) for d in _gt_as_detections(gt)]
    worse = evaluate_lvis(gt, shuffled)
    for iou_type in ("bbox", "segm"):
        assert worse[iou_type]["AP"] < 0.5
    # Boxes that are slightly off keep AP50 high and lower AP75.
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2]] + d["bbox"][1:])
               for d in _gt_as_detections(gt)]
    off = evaluate_lvis(gt, shifted, iou_types=["bbox"])["bbox"]
    assert off["AP50"] > off["AP75"]


def test_numpy_alias_is_not_left_behind(builtin_data: Path) -> None:
    gt = json.loads((builtin_data / "val.json").read_text())
    evaluate_lvis(gt, _gt_as_detections(gt)[:5], iou_types=["bbox"])
    assert "float" not in np.__dict__


def test_no_detections_is_zero_not_a_crash(builtin_data: Path) -> None:
    res = evaluate_lvis(str(builtin_data / "val.json"), [])
    assert res["bbox"]["AP"] == 0.0 and res["segm"]["APr"] == 0.0


def test_bad_detections_are_named(builtin_data: Path) -> None:
    gt = json.loads((builtin_data / "val.json").read_text())
    det = _gt_as_detections(gt)[0]
    with pytest.raises(ValueError, match="category_id=4242"):
        evaluate_lvis(gt, [dict(det, category_id=4242)])
    with pytest.raises(ValueError, match="has no field 'score'"):
        evaluate_lvis(gt, [{k: v for k, v in det.items() if k != "score"}])


def test_detections_file_must_hold_a_list(builtin_data: Path, tmp_path: Path) -> None:
    gt = str(builtin_data / "val.json")
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"annotations": [{"image_id": 1}]}))  # an object, not a list
    with pytest.raises(ValueError, match=rf"^{re.escape(str(dets))}: the file must hold a JSON "
                                         r"list of detections .* not a JSON object$"):
        evaluate_lvis(gt, str(dets))
    dets.write_text("[3, 4]")
    with pytest.raises(ValueError, match=r"detection #0 is a JSON number, not an object"):
        evaluate_lvis(gt, str(dets))


def test_box_only_detections_are_evaluated_on_bbox(builtin_data: Path) -> None:
    gt = json.loads((builtin_data / "val.json").read_text())
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in _gt_as_detections(gt)]
    skipped: list[tuple[str, str]] = []
    res = evaluate_lvis(gt, boxes, on_skip=lambda t, why: skipped.append((t, why)))
    assert list(res) == ["bbox"] and res["bbox"]["AP"] == pytest.approx(1.0)
    assert skipped == [("segm", f"{len(boxes)} of {len(boxes)} detections have no "
                                "'segmentation' (box-only results)")]
    with pytest.raises(ValueError, match=r"segm evaluation \(--iou-type segm\) needs a "
                                         r"'segmentation' .*\(the first is detection #0\)"):
        evaluate_lvis(gt, boxes, iou_types=["segm"])
    # Masks without boxes (after a first detection with one) are evaluated on both.
    masks = [d if i == 0 else {k: v for k, v in d.items() if k != "bbox"}
             for i, d in enumerate(_gt_as_detections(gt))]
    res = evaluate_lvis(gt, masks)
    assert res["bbox"]["AP"] == pytest.approx(1.0) and res["segm"]["AP"] == pytest.approx(1.0)
    assert "bbox" not in masks[1]  # the caller's dicts are left as they were


def test_evaluator_lifecycle_matches_function(builtin_data: Path) -> None:
    ds = LvisDataset(str(builtin_data), "val.json", max_images=20)
    gt = ds.subset([im["id"] for im in ds.images])
    ev = LvisEvaluator(gt, {c.label: c.id for c in ds.categories})
    for i in range(len(ds)):
        inst = ds.instances(i)
        ev.process(ds.images[i]["id"], inst["boxes"], np.ones(len(inst["labels"])),
                   inst["labels"], inst["masks"])
    res = ev.evaluate()
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)
    ev.reset()
    assert ev.detections == []

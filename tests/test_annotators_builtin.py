"""Built-in classical annotator against the procedural generator's drawn truth."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from annotators import ANNOTATORS, BuiltinAnnotator, build_annotator
from generators import PromptSampler
from generators.procedural import ProceduralGenerator

RATES = {"wrong_class": 0.1, "broken": 0.1, "clutter": 0.1, "noise": 0.1}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


@pytest.fixture(scope="module")
def annotated() -> dict[str, np.ndarray]:
    rows = PromptSampler.builtin(12, run_id="iou", seed=2).sample_batch(200)
    gen = ProceduralGenerator(num_classes=12, failure_rates=RATES, emit_truth_mask=True)
    return build_annotator("builtin")(gen(rows))


def test_masks_match_the_drawn_truth_on_non_failed_samples(annotated) -> None:
    ok = annotated["truth_failure"] == "none"
    iou = _iou(annotated["mask"][ok], annotated["truth_mask"][ok])
    print(f"built-in annotator IoU on {ok.sum()} non-failed samples: "
          f"min {iou.min():.4f} mean {iou.mean():.4f}")
    assert ok.sum() >= 100
    assert iou.min() >= 0.9


def test_mask_score_ranks_clean_objects_above_clutter_and_noise(annotated) -> None:
    score = annotated["mask_score"]
    assert score.dtype == np.float32 and ((score >= 0) & (score <= 1)).all()
    failures = annotated["truth_failure"]
    clean = score[failures == "none"]
    for bad in ("clutter", "noise"):
        assert np.median(score[failures == bad]) < np.median(clean) - 0.15, bad
    assert (annotated["num_components"][failures == "clutter"] >= 2).mean() > 0.8
    assert list(set(annotated["annotator"])) == ["builtin@1"]


def test_bad_images_become_invalid_image_rows() -> None:
    good = np.full((32, 32, 3), 250, dtype=np.uint8)
    good[8:24, 8:24] = (200, 20, 20)
    png = io.BytesIO()
    Image.fromarray(good).save(png, format="PNG")
    column = np.empty(5, dtype=object)
    column[:] = [good, None, b"\x89PNG not really", png.getvalue(), good.astype(np.float32)]
    out = BuiltinAnnotator()({"image": column})
    assert list(out["status"]) == [
        "ok", "invalid_image", "invalid_image", "ok", "invalid_image"
    ]
    assert "absent" in out["error"][1]
    assert "cannot be decoded" in out["error"][2]
    assert "dtype is float32" in out["error"][4]
    assert out["mask"].shape == (5, 32, 32)
    assert out["mask"][0].sum() == 16 * 16 and out["mask"][3].sum() == 16 * 16
    assert not out["mask"][1].any() and out["mask_score"][1] == 0.0


def test_rows_that_arrive_invalid_are_passed_through() -> None:
    images = np.full((2, 16, 16, 3), 255, dtype=np.uint8)
    images[:, 4:12, 4:12] = 0
    out = BuiltinAnnotator()(
        {"image": images, "status": np.array(["invalid_generation_error", "ok"], dtype=object),
         "error": np.array(["boom", ""], dtype=object)}
    )
    assert list(out["status"]) == ["invalid_generation_error", "ok"]
    assert out["error"][0] == "boom" and not out["mask"][0].any() and out["mask"][1].any()


def test_backend_factory() -> None:
    assert set(ANNOTATORS.names()) == {"builtin", "sam"}
    assert isinstance(build_annotator("builtin", threshold=30), BuiltinAnnotator)
    with pytest.raises(ValueError, match="'grabcut' is not an annotator backend"):
        build_annotator("grabcut")

"""Quality checks: every bad mask gets its invalid_* reason; cut-outs; optional CLIP score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from annotators import QualityCheck, rgba_cutout
from annotators.cutout import composite_on_white, mask_box
from annotators.tiny import write_tiny_clip

H = W = 32


def _image() -> np.ndarray:
    image = np.full((H, W, 3), 250, dtype=np.uint8)
    image[8:24, 10:20] = (30, 140, 200)
    return image


def _square(y0: int, y1: int, x0: int, x1: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _object_column(items: list) -> np.ndarray:
    col = np.empty(len(items), dtype=object)
    col[:] = items
    return col


def test_every_bad_mask_gets_its_reason_and_no_row_is_dropped() -> None:
    nan_mask = _square(8, 24, 10, 20).astype(np.float32)
    nan_mask[0, 0] = np.nan
    cases = {
        "ok": _square(8, 24, 10, 20),
        "invalid_empty_mask": np.zeros((H, W), dtype=bool),
        "invalid_area_ratio": np.ones((H, W), dtype=bool),  # all-true mask
        "invalid_nan_mask": nan_mask,
        "invalid_size_mismatch": np.ones((H // 2, W // 2), dtype=bool),
        "invalid_missing_mask": None,
    }
    images = _object_column([_image()] * len(cases))
    out = QualityCheck()({"image": images, "mask": _object_column(list(cases.values()))})
    assert list(out["status"]) == list(cases)
    errors = dict(zip(out["status"], out["error"]))
    assert "1 NaN" in errors["invalid_nan_mask"]
    assert "16 x 16 but the image is 32 x 32" in errors["invalid_size_mismatch"]
    assert "1.000 is outside [0.05, 0.95]" in errors["invalid_area_ratio"]
    assert out["area_ratio"][0] == pytest.approx(160 / 1024)
    assert out["area_ratio"][1] == 0.0 and out["area_ratio"][2] == 1.0
    assert np.isnan(out["area_ratio"][3]) and np.isnan(out["clip_score"]).all()
    assert out["mask"].shape == (6, H, W) and out["mask"].dtype == bool


def test_float_masks_threshold_and_corrupt_images_are_invalid_images() -> None:
    soft = _square(8, 24, 10, 20).astype(np.float32) * 0.9
    out = QualityCheck()(
        {
            "image": _object_column([_image(), b"garbage", None]),
            "mask": _object_column([soft, _square(8, 24, 10, 20), _square(8, 24, 10, 20)]),
        }
    )
    assert list(out["status"]) == ["ok", "invalid_image", "invalid_image"]
    assert out["mask"][0].sum() == 160


def test_largest_component_kept_and_components_counted() -> None:
    mask = _square(2, 20, 2, 20) | _square(26, 30, 26, 30) | _square(24, 25, 2, 3)
    out = QualityCheck()({"image": _image()[None], "mask": mask[None]})
    assert out["status"][0] == "ok" and out["num_components"][0] == 3
    np.testing.assert_array_equal(out["mask"][0], _square(2, 20, 2, 20))
    keep_all = QualityCheck(largest_component=False)({"image": _image()[None], "mask": mask[None]})
    assert keep_all["mask"][0].sum() == mask.sum()
    # An annotator's own raw count wins over the recount of the mask it handed over.
    given = QualityCheck()(
        {"image": _image()[None], "mask": mask[None], "num_components": np.array([7], np.int32)}
    )
    assert given["num_components"][0] == 7


def test_area_ratio_bounds_and_optional_border_touch() -> None:
    tiny = _square(0, 3, 0, 3)  # 9 / 1024 < 0.05
    edge = _square(0, 16, 0, 16)
    images = np.stack([_image()] * 2)
    out = QualityCheck()({"image": images, "mask": np.stack([tiny, edge])})
    assert list(out["status"]) == ["invalid_area_ratio", "ok"]
    both = np.stack([tiny, edge])
    strict = QualityCheck(reject_border_touch=True)({"image": images, "mask": both})
    assert list(strict["status"]) == ["invalid_area_ratio", "invalid_border_touch"]
    loose = QualityCheck(min_area_ratio=0.005)({"image": images[:1], "mask": tiny[None]})
    assert loose["status"][0] == "ok"
    with pytest.raises(ValueError, match="min_area_ratio < max_area_ratio"):
        QualityCheck(min_area_ratio=0.5, max_area_ratio=0.4)


def test_rows_already_invalid_are_not_rechecked() -> None:
    out = QualityCheck()(
        {
            "image": np.stack([_image()] * 2),
            "mask": np.zeros((2, H, W), dtype=bool),
            "status": np.array(["invalid_annotation_error", "ok"], dtype=object),
            "error": np.array(["from SAM", ""], dtype=object),
        }
    )
    assert list(out["status"]) == ["invalid_annotation_error", "invalid_empty_mask"]
    assert out["error"][0] == "from SAM"


def test_rgba_cutout_is_cropped_to_the_mask_box() -> None:
    image = _image()
    mask = _square(8, 24, 10, 20)
    mask[8, 10] = False
    rgba = rgba_cutout(image, mask)
    assert mask_box(mask) == (10, 8, 20, 24)
    assert rgba.shape == (16, 10, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 3] == 0 and rgba[1, 1, 3] == 255
    np.testing.assert_array_equal(rgba[1, 1, :3], (30, 140, 200))
    assert composite_on_white(rgba)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="empty"):
        rgba_cutout(image, np.zeros((H, W), dtype=bool))


def test_clip_score_of_the_cutout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_tiny_clip(tmp_path / "tiny-clip")
    check = QualityCheck(clip_model=str(folder))
    images = np.stack([_image()] * 3)
    masks = np.stack([_square(8, 24, 10, 20), _square(8, 24, 10, 20), np.zeros((H, W), bool)])
    batch = {"image": images, "mask": masks,
             "class_name": np.array(["blue_box", "red_ball", "blue_box"], dtype=object)}
    out = check(batch)
    assert list(out["status"]) == ["ok", "ok", "invalid_empty_mask"]
    scores = out["clip_score"]
    assert np.isfinite(scores[:2]).all() and np.isnan(scores[2])
    assert ((scores[:2] >= -1) & (scores[:2] <= 1)).all()
    assert scores[0] != scores[1]  # the text is part of the score
    again = check(batch)["clip_score"]
    np.testing.assert_allclose(again[:2], scores[:2], rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="cannot be loaded"):
        QualityCheck(clip_model=str(tmp_path / "no-clip"))

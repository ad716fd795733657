"""SAM annotator on a tiny SAM built from segment-anything's modules."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from annotators import build_annotator
from annotators.sam import SamAnnotator, build_sam, load_sam_state_dict
from annotators.sam_prompts import make_prompt
from annotators.tiny import build_tiny_sam


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam(img_size=64)


def _images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 245, dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(4, size // 2, size=2)
        images[i, y : y + size // 2, x : x + size // 2] = rng.integers(0, 200, size=3)
    return images


def test_annotates_a_batch_with_the_contract_columns(tiny_sam) -> None:
    annotator = build_annotator("sam", model=tiny_sam, prompt="corners", images_per_forward=4)
    out = annotator({"image": _images(6), "sample_id": np.arange(6)})
    assert out["mask"].shape == (6, 48, 48) and out["mask"].dtype == bool
    assert out["mask_score"].dtype == np.float32
    assert ((out["mask_score"] >= 0) & (out["mask_score"] <= 1)).all()
    assert list(out["status"]) == ["ok"] * 6
    assert out["annotator"][0].startswith("sam:custom@")
    np.testing.assert_array_equal(out["sample_id"], np.arange(6))


def test_batched_inference_equals_one_image_at_a_time(tiny_sam, monkeypatch) -> None:
    images = _images(5, seed=1)
    batched = SamAnnotator(model=tiny_sam, images_per_forward=5)
    calls: list[int] = []
    real = tiny_sam.image_encoder.forward
    monkeypatch.setattr(
        tiny_sam.image_encoder, "forward", lambda x: (calls.append(x.shape[0]), real(x))[1]
    )
    together = batched({"image": images})
    assert calls == [5]  # one encoder forward for the whole batch
    calls.clear()
    single = SamAnnotator(model=tiny_sam, images_per_forward=1)
    for i in range(5):
        alone = single({"image": images[i : i + 1]})
        np.testing.assert_array_equal(alone["mask"][0], together["mask"][i])
        assert alone["mask_score"][0] == pytest.approx(together["mask_score"][i], abs=1e-5)
    assert calls == [1] * 5


def test_prompt_strategies(tiny_sam) -> None:
    corners = make_prompt("corners", 40, 60)
    assert corners.invert and corners.points.tolist() == [[0, 0], [59, 0], [0, 39], [59, 39]]
    box = make_prompt("box", 40, 60, box_margin=0.1)
    assert not box.invert and box.box.tolist() == pytest.approx([6, 4, 53, 35])
    point = make_prompt("point", 40, 60)
    assert point.points.tolist() == [[29.5, 19.5]] and point.labels.tolist() == [1]
    images = _images(2)
    masks = {}
    for strategy in ("corners", "box", "point"):
        masks[strategy] = SamAnnotator(model=tiny_sam, prompt=strategy)({"image": images})["mask"]
    # The corners prompt selects the background, so its mask is inverted SAM output: recompute
    # the raw prediction and check the inversion.
    annotator = SamAnnotator(model=tiny_sam, prompt="corners")
    raw = annotator.model(
        [annotator._model_input(images[0], make_prompt("corners", 48, 48))],
        multimask_output=True,
    )[0]
    best = int(raw["iou_predictions"][0].argmax())
    np.testing.assert_array_equal(masks["corners"][0], ~raw["masks"][0, best].numpy())
    with pytest.raises(ValueError, match="unknown SAM prompt strategy 'scribble'"):
        SamAnnotator(model=tiny_sam, prompt="scribble")


def test_a_failing_image_is_isolated(tiny_sam) -> None:
    images = np.empty(3, dtype=object)
    images[:] = [_images(1)[0], np.zeros((48, 48), dtype=np.int16), _images(1, seed=3)[0]]
    out = SamAnnotator(model=tiny_sam)({"image": images})
    assert list(out["status"]) == ["ok", "invalid_image", "ok"]
    annotator = SamAnnotator(model=tiny_sam, images_per_forward=3)
    original = annotator._forward

    def fragile(chunk):
        if any(im.shape[0] == 40 for im in chunk):
            raise RuntimeError("decoder exploded")
        return original(chunk)

    annotator._forward = fragile
    mixed = np.empty(3, dtype=object)
    mixed[:] = [_images(1)[0], _images(1, size=40)[0], _images(1, seed=4)[0]]
    out = annotator({"image": mixed})
    assert list(out["status"]) == ["ok", "invalid_annotation_error", "ok"]
    assert "decoder exploded" in out["error"][1]
    assert out["mask"].dtype == object and out["mask"][1].shape == (40, 40)


def test_checkpoint_loads_with_weights_only(tiny_sam, tmp_path: Path) -> None:
    path = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), path)
    fresh = build_tiny_sam(img_size=64, seed=123)
    load_sam_state_dict(fresh, path)
    images = _images(2)
    a = SamAnnotator(model=tiny_sam)({"image": images})
    b = SamAnnotator(model=fresh)({"image": images})
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert a["annotator"][0] == b["annotator"][0]  # same weights, same fingerprint
    # A checkpoint that needs arbitrary unpickling is refused.
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"x": Path("/etc")}, fh, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_sam_state_dict(fresh, evil)
    # A state dict of another architecture names the model type to check.
    other = tmp_path / "other.pth"
    torch.save(build_tiny_sam(img_size=64, embed_dim=16).state_dict(), other)
    with pytest.raises(ValueError, match="sam_model_type"):
        load_sam_state_dict(fresh, other)


def test_missing_checkpoint_and_bad_model_type_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "sam_vit_b.pth"
    with pytest.raises(FileNotFoundError) as info:
        SamAnnotator.from_checkpoint("vit_b", missing)
    assert str(missing) in str(info.value) and "sam_vit_b_01ec64.pth" in str(info.value)
    assert "annotation.sam_checkpoint" in str(info.value)
    with pytest.raises(ValueError, match="needs checkpoint="):
        SamAnnotator()
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'"):
        build_sam("vit_x", missing)

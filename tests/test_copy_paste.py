"""Copy-paste of candidates onto real images, and the trainer's candidate checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from trainer.candidates import (
    DECISION_FIELDS,
    Candidate,
    batch_rows,
    check_candidate,
    cut_out,
    decision_record,
)
from trainer.copy_paste import ClassSizeStatistics, CopyPaste, SideStatistics
from trainer.datasets import LvisDataset

MAGENTA = np.array([255, 0, 255], dtype=np.uint8)
TRAIN_IMAGES = 40  # the conftest ``train_set`` fixture: the first 40 training images


def _candidate(position: int, label: int, size: int = 40, color=MAGENTA) -> Candidate:
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.2) ** 2
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    rgb[:] = color
    return Candidate(position=position, sample_id=f"c{position}", class_id=label, label=label,
                     rgb=rgb, mask=mask)


def _blank_sample(size: int = 128, boxes=(), masks=(), labels=()) -> dict:
    return {
        "image": np.full((size, size, 3), 200, dtype=np.uint8),
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.array(labels, dtype=np.int64),
        "masks": np.array(masks, dtype=bool).reshape(-1, size, size),
    }


def test_pasted_instances_are_flagged_and_original_is_kept(train_set: LvisDataset) -> None:
    paster = CopyPaste(ClassSizeStatistics.from_dataset(train_set), seed=0)
    sample = train_set[0]
    image_before = sample["image"].copy()
    masks_before = sample["masks"].copy()
    pasted = paster.paste(sample, [_candidate(7, 1), _candidate(9, 2)])
    assert pasted.pasted_positions == [7, 9]
    assert pasted.generated.dtype == bool
    n_real = int((~pasted.generated).sum())
    assert pasted.num_generated >= 1
    assert list(pasted.generated) == [False] * n_real + [True] * pasted.num_generated
    # The original is the dataset sample, untouched.
    assert pasted.original is sample
    np.testing.assert_array_equal(sample["image"], image_before)
    np.testing.assert_array_equal(sample["masks"], masks_before)
    # Hard blending: every pixel of a surviving pasted mask is the candidate's colour, and the
    # pixels outside all pastes are the original's.
    union = np.zeros(image_before.shape[:2], dtype=bool)
    for m, gen in zip(pasted.masks, pasted.generated):
        if gen:
            assert (pasted.image[m] == MAGENTA).all()
            union |= m
    untouched = ~(pasted.image == MAGENTA).all(axis=2)
    np.testing.assert_array_equal(pasted.image[untouched], image_before[untouched])
    for box, m in zip(pasted.boxes, pasted.masks):
        ys, xs = np.nonzero(m)
        assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1
        assert ys.min() >= box[1] - 1 and ys.max() < box[3] + 1


def test_occlusion_updates_and_drops_real_instances() -> None:
    size = 128
    big = np.zeros((size, size), bool)
    big[10:110, 10:110] = True
    small = np.zeros((size, size), bool)
    small[60:64, 60:64] = True
    sample = _blank_sample(size, boxes=[[10, 10, 110, 110], [60, 60, 64, 64]],
                           masks=[big, small], labels=[1, 2])
    # A full-square candidate as large as the image covers everything.
    sizes = ClassSizeStatistics({}, SideStatistics(mean=0.6, std=0.0))
    paster = CopyPaste(sizes, min_visible_fraction=0.3, max_side=0.8, seed=1,
                       aspect_range=(1.0, 1.0))
    square = Candidate(0, "sq", 3, 3, np.full((50, 50, 3), 7, np.uint8), np.ones((50, 50), bool))
    pasted = paster.paste(sample, [square])
    paste_mask = pasted.masks[pasted.generated][0]
    real_masks = pasted.masks[~pasted.generated]
    for m in real_masks:
        assert not (m & paste_mask).any()  # real masks lost the pasted pixels
    covered_small = (small & paste_mask).sum() / small.sum()
    kept_labels = list(pasted.labels[~pasted.generated])
    assert (2 in kept_labels) == (covered_small <= 0.7)
    covered_big = (big & paste_mask).sum() / big.sum()
    assert covered_big > 0 and 1 in kept_labels  # 0.6² of the image: the big one stays
    # A paste covering the whole image leaves no real instance.
    full_cover = CopyPaste(ClassSizeStatistics({}, SideStatistics(mean=1.0, std=0.0)),
                           max_side=1.0, seed=1, aspect_range=(1.0, 1.0))
    covered = full_cover.paste(sample, [square])
    assert list(covered.generated) == [True] and covered.masks[0].all()
    big_after = real_masks[kept_labels.index(1)]
    ys, xs = np.nonzero(big_after)
    box = pasted.boxes[~pasted.generated][kept_labels.index(1)]
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_pasted_sizes_follow_class_statistics() -> None:
    sizes = ClassSizeStatistics({1: SideStatistics(0.15, 0.02), 2: SideStatistics(0.45, 0.03)},
                                SideStatistics(0.3, 0.05))
    paster = CopyPaste(sizes, seed=0)
    sides = {1: [], 2: [], 5: []}
    for i in range(60):
        for label in sides:
            pasted = paster.paste(_blank_sample(), [_candidate(i, label, size=30)])
            m = pasted.masks[pasted.generated][0]
            sides[label].append(np.sqrt(m.sum() / m.size))
    assert np.mean(sides[1]) == pytest.approx(0.15, abs=0.02)
    assert np.mean(sides[2]) == pytest.approx(0.45, abs=0.03)
    assert np.mean(sides[5]) == pytest.approx(0.3, abs=0.03)  # unknown label: all classes


def test_class_statistics_from_dataset(train_set: LvisDataset) -> None:
    sizes = ClassSizeStatistics.from_dataset(train_set, min_class_instances=2)
    assert 0.1 < sizes.overall.mean < 0.5
    counts = Counter(train_set.cat_by_id[a["category_id"]].label
                     for anns in train_set.anns_by_image.values() for a in anns)
    for label in range(1, train_set.num_classes + 1):
        if counts[label] >= 2:
            assert label in sizes.per_label
        else:
            assert sizes.get(label) is sizes.overall


def test_assignment_uses_each_candidate_once_and_balances_classes() -> None:
    sizes = ClassSizeStatistics({}, SideStatistics(0.2, 0.05))
    paster = CopyPaste(sizes, max_per_image=3, seed=0)
    pool = [_candidate(i, 1 if i < 90 else 2) for i in range(100)]
    first_picks = []
    seen = []
    while pool:
        chosen = paster.assign(pool, 4)
        assert len(chosen) == 4 and all(len(c) <= 3 for c in chosen)
        flat = [c for per_image in chosen for c in per_image]
        assert flat, "a step with candidates waiting pastes at least one"
        seen.extend(c.position for c in flat)
        if len(first_picks) < 16:
            first_picks.extend(c.label for c in flat)
    assert sorted(seen) == list(range(100))
    # Class-balanced: the 10 candidates of class 2 are drawn about as often as class 1 early on.
    assert 0.25 < first_picks[:16].count(2) / 16 < 0.75


def test_candidate_checks_name_the_problem() -> None:
    label_of = {5: 1}
    image = np.zeros((32, 32, 3), np.uint8)
    good = np.zeros((32, 32), bool)
    good[4:20, 4:20] = True
    row = {"sample_id": "a", "class_id": 5, "image": image, "mask": good, "status": "ok"}
    assert check_candidate(row, label_of) is None
    assert check_candidate(dict(row, status="invalid_border_touch"), label_of) == \
        "invalid_border_touch"
    assert check_candidate(dict(row, status="weird"), label_of) == "invalid_status"
    assert check_candidate(dict(row, class_id=99), label_of) == "invalid_unknown_class"
    assert check_candidate(dict(row, mask=np.zeros((32, 32), bool)), label_of) == \
        "invalid_empty_mask"
    assert check_candidate(dict(row, mask=np.ones((32, 32), bool)), label_of) == \
        "invalid_full_mask"
    assert check_candidate(dict(row, mask=good[:16]), label_of) == "invalid_size_mismatch"
    nan_mask = good.astype(np.float32)
    nan_mask[0, 0] = np.nan
    assert check_candidate(dict(row, mask=nan_mask), label_of) == "invalid_nan_mask"
    assert check_candidate(dict(row, image=image[..., 0]), label_of) == "invalid_image"
    cand = cut_out(3, dict(row, mask_score=np.float32(0.9)), 1)
    assert cand.rgb.shape == (16, 16, 3) and cand.mask.all() and cand.position == 3
    assert cand.fields == {"mask_score": pytest.approx(0.9)}


def test_every_reason_has_one_kind() -> None:
    import generators.columns as gc
    from selector import INVALID_REASONS, REASONS
    from selector import is_invalid as selector_is_invalid
    from trainer import candidates

    assert gc.reason_kind("accepted") == "accepted"
    assert gc.reason_kind("rejected_score") == "rejected"
    # The selector's own vocabulary (it imports nothing from the project) agrees.
    for reason in REASONS:
        kind = gc.reason_kind(reason)
        assert kind in gc.DECISION_KINDS
        assert (kind == "invalid") == (reason in INVALID_REASONS) == selector_is_invalid(reason)
    statuses = [v for k, v in vars(gc).items()
                if k.startswith("INVALID_") and k != "INVALID_PREFIX"]
    statuses += [candidates.INVALID_STATUS, candidates.INVALID_FULL_MASK,
                 candidates.INVALID_NAN_LOSS]
    assert len(statuses) == len(set(statuses)) and all(
        gc.reason_kind(s) == "invalid" for s in statuses)
    for bad in ("ok", "rejected", "invalid", "maybe"):
        with pytest.raises(ValueError, match="is not 'accepted'"):
            gc.reason_kind(bad)


def test_batch_rows_accepts_columns_and_rows() -> None:
    cols = {"sample_id": np.array(["a", "b"]), "class_id": np.array([1, 2]),
            "image": np.zeros((2, 4, 4, 3), np.uint8), "mask": np.zeros((2, 4, 4), bool),
            "status": np.array(["ok", "ok"], dtype=object)}
    rows = batch_rows(cols)
    assert [r["sample_id"] for r in rows] == ["a", "b"]
    assert batch_rows(rows)[1]["class_id"] == 2
    with pytest.raises(ValueError, match="lacks column"):
        batch_rows({k: v for k, v in cols.items() if k != "mask"})
    with pytest.raises(ValueError, match="different lengths"):
        batch_rows(dict(cols, class_id=np.array([1])))
    record = decision_record("a", reason="invalid_empty_mask", accepted=False, step=3, rank=0,
                             method="bsgal", stream_offset=11)
    assert np.isnan(record["score"]) and record["batch_id"] == "" and record["step"] == 3
    assert record["stream_offset"] == 11 and tuple(record) == DECISION_FIELDS

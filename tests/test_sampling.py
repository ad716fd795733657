"""Repeat-factor sampling (LVIS) and the class-aware real "test" sampler."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from trainer.sampling import ClassAwareSampler, RepeatFactorSampler, repeat_factors


def _images() -> list[set[int]]:
    # 1000 images: class 1 in all, class 2 in 1 (rare), class 3 in 100, image 999 also empty.
    cats = [{1} for _ in range(1000)]
    cats[0] = {1, 2}
    for i in range(1, 101):
        cats[i] = {1, 3}
    cats[999] = set()
    return cats


def test_repeat_factors_follow_the_lvis_formula() -> None:
    cats = _images()
    r = repeat_factors(cats, threshold=0.1)
    assert r[0] == pytest.approx(math.sqrt(0.1 / 0.001))  # class 2: f = 1/1000
    assert r[1] == pytest.approx(1.0)                     # class 3: f = 0.1 → max(1, 1)
    assert r[500] == 1.0 and r[999] == 1.0                # frequent only / no annotation
    r = repeat_factors(cats, threshold=0.001)             # LVIS threshold
    assert r[0] == pytest.approx(1.0) and r.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 0"):
        repeat_factors(cats, threshold=-1)


def test_sampler_repeats_rare_images_about_r_times_per_epoch() -> None:
    cats = _images()
    sampler = RepeatFactorSampler(cats, threshold=0.1, seed=0)
    expected_epoch = sampler.factors.sum()
    counts = Counter(sampler.next_indices(int(expected_epoch * 20)))
    assert counts[0] / 20 == pytest.approx(math.sqrt(100), rel=0.1)
    assert counts[500] / 20 == pytest.approx(1.0, abs=0.3)


def test_sampler_resumes_exactly() -> None:
    cats = _images()
    a = RepeatFactorSampler(cats, threshold=0.1, seed=3)
    a.next_indices(1500)  # crosses into the second epoch
    state = a.state_dict()
    expected = a.next_indices(700)
    b = RepeatFactorSampler(cats, threshold=0.1, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(700) == expected
    c = RepeatFactorSampler(cats, threshold=0.1, seed=4)
    c.load_state_dict(dict(state, seed=4))
    assert c.next_indices(700) != expected


def test_class_aware_sampler_returns_images_with_the_classes() -> None:
    cats = _images()
    sampler = ClassAwareSampler(cats, seed=0)
    picks = sampler.sample([2, 3], 4)
    assert len(picks) == 4
    # Two classes, four images: each class serves two images, alternating.
    contains = [(2 in cats[i], 3 in cats[i]) for i in picks]
    assert sum(c2 for c2, _ in contains) == 2 and sum(c3 for _, c3 in contains) == 2
    assert all(2 in cats[i] or 3 in cats[i] for i in picks)
    # A class no image contains falls back to any image.
    assert len(sampler.sample([77], 3)) == 3
    state = sampler.state_dict()
    nxt = sampler.sample([3], 5)
    sampler.load_state_dict(state)
    assert sampler.sample([3], 5) == nxt
    assert all(0 <= i < len(cats) for i in sampler.sample([], 2))


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training images"):
        RepeatFactorSampler([], 0.001)
    with pytest.raises(ValueError, match="no training images"):
        ClassAwareSampler([])
    assert np.all(repeat_factors([{1}, {2}], 0.0) == 1.0)

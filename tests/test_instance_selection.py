"""Instance-level selection: re-rendering a subset, per-instance scores and their estimators,
the per-class threshold, quality gates, and the trainer deciding candidate by candidate."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks._candidate_stream import real_cutouts
from pipeline.config import ConfigError, load_config
from selector.decision import INVALID_EMPTY_CACHE, INVALID_NAN_SCORE, REJECTED_QUALITY
from selector.instance_selector import (
    ClassGradientCaches,
    InstanceSelector,
    PerClassPercentileThreshold,
    QualityGates,
)
from tests.conftest import CONFIGS
from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
from trainer.candidates import cut_out
from trainer.copy_paste import ClassSizeStatistics, CopyPaste
from trainer.datasets import LvisDataset
from trainer.factory import build_trainer
from trainer.instance_scores import (
    directional_dots,
    exact_dots,
    flat,
    generated_instances,
)
from trainer.real_data import pasted_inputs

TRAIN_IMAGES = 64  # the conftest ``train_set`` fixture: the first 64 training images


def _cutouts(ds: LvisDataset, count: int, seed: int = 0) -> list[Any]:
    label_of = {c.id: c.label for c in ds.categories}
    rows = real_cutouts(ds, count, seed=seed, mask_scores=True)
    return [cut_out(i, r, label_of[int(r["class_id"])]) for i, r in enumerate(rows)]


# -- copy-paste of a subset -------------------------------------------------------------------


def test_rerendering_a_subset_is_pixel_exact_as_if_the_rest_had_never_been_pasted(
        train_set: LvisDataset) -> None:
    paster = CopyPaste(ClassSizeStatistics.from_dataset(train_set), max_per_image=3, seed=3)
    sample = train_set[0]
    candidates = _cutouts(train_set, 3, seed=2)
    pasted = paster.paste(sample, candidates)
    assert len(pasted.placements) == 3
    state = paster.state_dict()
    keep = {candidates[0].position, candidates[2].position}
    subset = paster.rerender(pasted, keep)
    assert paster.state_dict() == state  # re-rendering draws no random numbers
    # the same placements composed without the middle one, by hand
    expected = sample["image"].copy()
    for placed in (pasted.placements[0], pasted.placements[2]):
        h, w = placed.mask.shape
        region = expected[placed.y:placed.y + h, placed.x:placed.x + w]
        region[placed.mask] = placed.rgb[placed.mask]
    np.testing.assert_array_equal(subset.image, expected)
    assert sorted(subset.source_positions[subset.generated].tolist()) == sorted(keep)
    assert subset.pasted_positions == [candidates[0].position, candidates[2].position]
    # nothing kept: the original, instances included; everything kept: the pasted image
    empty = paster.rerender(pasted, set())
    np.testing.assert_array_equal(empty.image, sample["image"])
    np.testing.assert_array_equal(empty.boxes, sample["boxes"])
    assert empty.num_generated == 0
    full = paster.rerender(pasted, {c.position for c in candidates})
    np.testing.assert_array_equal(full.image, pasted.image)
    np.testing.assert_array_equal(full.masks, pasted.masks)


def test_generated_instances_locate_each_candidate_among_the_ground_truth(
        train_set: LvisDataset) -> None:
    paster = CopyPaste(ClassSizeStatistics.from_dataset(train_set), seed=0)
    candidates = _cutouts(train_set, 4, seed=5)
    pasted = [paster.paste(train_set[0], candidates[:2]), paster.paste(train_set[1],
                                                                       candidates[2:])]
    inst = generated_instances(pasted)
    labels = np.concatenate([p.labels for p in pasted])
    generated = np.concatenate([p.generated for p in pasted])
    assert sorted(inst.rows.tolist()) == np.flatnonzero(generated).tolist()
    assert inst.labels.tolist() == labels[inst.rows].tolist()
    by_position = {c.position: c.label for c in candidates}
    assert [by_position[p] for p in inst.positions.tolist()] == inst.labels.tolist()


# -- estimators ---------------------------------------------------------------------------------


def test_directional_estimate_agrees_with_exact_per_instance_dots(train_set: LvisDataset
                                                                  ) -> None:
    torch.manual_seed(0)
    backend = TorchvisionMaskRCNN.build(train_set.num_classes, "small", 128)
    backend.module.train()
    paster = CopyPaste(ClassSizeStatistics.from_dataset(train_set), seed=1)
    candidates = _cutouts(train_set, 6, seed=7)
    pasted = [paster.paste(train_set[i], candidates[2 * i:2 * i + 2]) for i in range(3)]
    inst = generated_instances(pasted)
    images, targets = pasted_inputs(pasted, "cpu")
    params = backend.trainable_parameters()
    rows = torch.as_tensor(inst.rows)
    # a direction: the gradient of a real loss (what the cache holds)
    real = backend.real_classification_loss(*pasted_inputs(pasted[:1], "cpu"))
    direction = flat(torch.autograd.grad(real, params, allow_unused=True), params)
    before = [p.detach().clone() for p in params]
    exact, norms = exact_dots(backend.gt_box_losses(images, targets)[rows], params,
                              direction.expand(len(rows), -1))
    buffers = list(backend.module.buffers())  # BatchNorm running statistics
    buffers_before = [b.clone() for b in buffers]
    estimate = directional_dots(lambda: backend.gt_box_losses(images, targets)[rows], params,
                                direction, eps=1e-3, buffers=buffers)
    assert len(rows) >= 4 and bool((norms > 0).all())
    pearson = float(np.corrcoef(exact.detach().numpy(), estimate.numpy())[0, 1])
    assert pearson >= 0.99, (exact, estimate)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # weights put back exactly
    assert all(torch.equal(b, c) for b, c in zip(buffers, buffers_before))


def test_directional_estimate_refuses_a_poisoned_direction() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(FloatingPointError, match="poisoned"):
        directional_dots(lambda: (p * 2).reshape(1, 3).sum(1), [p],
                         torch.tensor([1.0, math.nan, 0.0]))


# -- threshold, gates, selector -----------------------------------------------------------------


def test_per_class_threshold_keeps_the_asked_fraction_of_each_class_from_the_first_step() -> None:
    threshold = PerClassPercentileThreshold(0.5, window_steps=1000)
    first = threshold.decide_all([3.0], [7], step=0)
    assert first[0].accepted  # no constant to beat: the first score is its own threshold
    rng = np.random.default_rng(0)
    kept: Counter = Counter()
    seen: Counter = Counter()
    for step in range(1, 301):
        # class 1 scores around 10, class 2 around -10: a pooled threshold would keep only 1
        scores = [float(rng.normal(10, 1)), float(rng.normal(-10, 1))]
        for d, c in zip(threshold.decide_all(scores, [1, 2], step=step), [1, 2]):
            kept[c] += d.accepted
            seen[c] += 1
    for c in (1, 2):
        assert 0.45 <= kept[c] / seen[c] <= 0.56, (c, kept[c] / seen[c])
    pooled = PerClassPercentileThreshold(0.5, window_steps=100, per_class=False)
    decisions = [pooled.decide_all([float(rng.normal(10, 1)), float(rng.normal(-10, 1))],
                                   [1, 2], step=s) for s in range(100)]
    assert sum(d[1].accepted for d in decisions) <= 5  # the low class starves when pooled


def test_quality_gates_reject_below_and_name_missing_or_nan_fields() -> None:
    gates = QualityGates({"mask_score": 0.8})
    assert gates.check({"mask_score": 0.9}) is None
    assert gates.check({"mask_score": 0.5}) == REJECTED_QUALITY
    assert gates.check({}) == "invalid_missing_field"
    assert gates.check({"mask_score": math.nan}) == "invalid_nan_field"
    with pytest.raises(ValueError, match="not finite"):
        QualityGates({"mask_score": math.inf})


def test_composite_gates_first_then_scores_against_its_class_cache() -> None:
    params = [torch.nn.Parameter(torch.zeros(4))]
    caches = ClassGradientCaches(params)
    selector = InstanceSelector("composite", gates=QualityGates({"mask_score": 0.8}),
                                threshold=PerClassPercentileThreshold(0.5, window_steps=100), caches=caches)
    assert caches.update(1, torch.tensor([1.0, 0, 0, 0])) is None
    assert caches.update(2, torch.tensor([math.nan, 0, 0, 0])) == "invalid_nan_real_grad"
    assert caches.get(2) is None  # a poisoned gradient never becomes a cache
    score, norm = selector.contribution(1, torch.tensor([2.0, 0, 0, 0]))
    assert score == pytest.approx(1.0) and norm == pytest.approx(1.0)
    assert selector.contribution(2, torch.ones(4)) == (None, None)
    decisions = selector.decide(
        step=0, class_ids=[1, 1, 2, 1],
        fields=[{"mask_score": 0.3}, {"mask_score": 0.9}, {"mask_score": 0.9},
                {"mask_score": 0.95}],
        scores=[0.9, 0.8, None, math.nan], cache_norms=[1.0, 1.0, None, 1.0])
    assert [d.reason for d in decisions] == [REJECTED_QUALITY, "accepted", INVALID_EMPTY_CACHE,
                                             INVALID_NAN_SCORE]
    assert decisions[1].score == pytest.approx(0.8) and decisions[1].cache_norm == 1.0


def test_instance_selector_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]

    def make() -> InstanceSelector:
        return InstanceSelector("composite", gates=QualityGates({"mask_score": 0.5}),
                                threshold=PerClassPercentileThreshold(0.5, window_steps=100),
                                caches=ClassGradientCaches(params))

    a = make()
    a.caches.update(4, torch.tensor([1.0, 2.0, 3.0]))
    a.threshold.decide_all([0.1, 0.5, 0.9], [4, 4, 4], step=0)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(b.caches.get(4).buffer, a.caches.get(4).buffer)
    same = [d.accepted for d in a.threshold.decide_all([0.4, 0.6], [4, 4], step=1)]
    assert [d.accepted for d in b.threshold.decide_all([0.4, 0.6], [4, 4], step=1)] == same


# -- the trainer ------------------------------------------------------------------------------


def _trainer(ds: LvisDataset, **selection: Any):
    return build_trainer(ds, training={"batch_size": 2, "lr": 5e-4, "warmup_steps": 2,
                                       "steps": 20, "device": "cpu", "max_pastes_per_image": 2},
                         selection={"granularity": "instance", **selection}, seed=0)


@pytest.mark.parametrize("method", ["composite", "gated_loss", "loss", "random"])
def test_instance_trainer_decides_each_candidate_and_trains_only_on_the_accepted(
        train_set: LvisDataset, method: str) -> None:
    trainer = _trainer(train_set, method=method, threshold="dynamic", keep_fraction=0.5,
                       quality_gates={"mask_score": 0.5})
    seen: list[tuple[int, int]] = []
    original = trainer.step_fn.backward_stock

    def recording(images, targets, step, batch):
        seen.append((step, sum(int(t["generated"].sum()) for t in targets)))
        return original(images, targets, step, batch)

    trainer.step_fn.backward_stock = recording
    rows = real_cutouts(train_set, 16, seed=3, mask_scores=True)
    result = trainer.train_on_candidates(rows)
    assert [d["sample_id"] for d in result.decisions] == [r["sample_id"] for r in rows]
    reasons = Counter(d["reason"] for d in result.decisions)
    assert reasons["accepted"] > 0 and sum(reasons.values()) == len(rows)
    assert reasons["accepted"] < len(rows) - reasons["invalid_not_visible"]
    if method in ("composite", "gated_loss"):
        low = [d for d, r in zip(result.decisions, rows) if r["mask_score"] < 0.5]
        assert low and all(d["reason"] == REJECTED_QUALITY for d in low)
    if method == "composite":
        scored = [d for d in result.decisions if d["reason"] in ("accepted", "rejected_score")]
        assert all(-1.0 <= d["score"] <= 1.0 and d["cache_norm"] > 0 for d in scored)
        assert len({round(d["score"], 6) for d in scored}) > 1  # each has its own score
    # each training pass holds exactly the candidates accepted at its step
    accepted_per_step = Counter(d["step"] for d in result.decisions if d["accepted"])
    assert [n for _, n in seen] == [accepted_per_step.get(s, 0) for s, _ in seen]


@pytest.mark.parametrize("sketch", ["none", "input_basis"])
def test_a_poisoned_real_gradient_never_becomes_a_cache_and_its_candidates_say_so(
        train_set: LvisDataset, sketch: str) -> None:
    from selector.class_sketch import LayerFactors

    trainer = _trainer(train_set, method="composite", threshold="dynamic", keep_fraction=0.5,
                       quality_gates={"mask_score": 0.5}, cache_sketch=sketch)
    caches = trainer.selector.caches
    real_update = caches.update

    def poisoned(class_id: int, grad: Any, **kw: Any) -> Any:
        if isinstance(grad, list):  # sketched: the boxes' factors
            grad = [LayerFactors(f.name, f.x, f.delta * float("nan"), f.has_bias) for f in grad]
        else:
            grad = grad * float("nan")
        return real_update(class_id, grad, **kw)

    caches.update = poisoned
    rows = real_cutouts(train_set, 8, seed=6, mask_scores=True)
    result = trainer.train_on_candidates(rows)
    reasons = Counter(d["reason"] for d in result.decisions)
    assert reasons["invalid_nan_real_grad"] > 0
    assert set(reasons) <= {"invalid_nan_real_grad", REJECTED_QUALITY, "invalid_not_visible"}
    assert caches.caches == {}
    assert all(torch.isfinite(p).all() for p in trainer.backend.trainable_parameters())


def test_instance_trainer_resumes_bit_for_bit(train_set: LvisDataset, tmp_path) -> None:
    rows = real_cutouts(train_set, 24, seed=4, mask_scores=True)
    a = _trainer(train_set, method="composite", threshold="dynamic", keep_fraction=0.5,
                 quality_gates={"mask_score": 0.3})
    a.train_on_candidates(rows[:12])
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    rest_a = a.train_on_candidates(rows[12:]).decisions
    b = _trainer(train_set, method="composite", threshold="dynamic", keep_fraction=0.5,
                 quality_gates={"mask_score": 0.3})
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    rest_b = b.train_on_candidates(rows[12:]).decisions
    assert [(d["reason"], d["score"]) for d in rest_a] == [(d["reason"], d["score"])
                                                           for d in rest_b]


def test_config_rejects_a_method_of_the_other_granularity() -> None:
    with pytest.raises(ConfigError, match="not a batch-level method"):
        load_config(CONFIGS / "demo.yaml", ["selection.granularity=batch",
                                            "selection.method=composite"])
    with pytest.raises(ConfigError, match="not a instance-level method"):
        load_config(CONFIGS / "demo.yaml", ["selection.granularity=instance",
                                            "selection.method=lookahead"])
    with pytest.raises(ConfigError, match="efficient mode was removed"):
        load_config(CONFIGS / "demo.yaml", ["selection.granularity=instance",
                                            "selection.method=composite",
                                            "selection.mode=efficient"])

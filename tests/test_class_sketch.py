"""Sketched class caches against the exact ones, on the small model where exact is affordable:
the factors give every box's exact gradient; a full-span basis makes the sketch exact; the
default rank keeps the cosines' order; re-expression, checkpoints, the top-up of stale classes
and the memory figures."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from selector.class_sketch import InputBasis, LayerFactors, SketchedClassCaches, top_basis
from selector.instance_selector import ClassGradientCaches
from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
from trainer.datasets import LvisDataset
from trainer.head_factors import head_factors, linear_layers
from trainer.instance_scores import flat
from trainer.real_data import real_inputs

TRAIN_IMAGES = 64


@pytest.fixture(scope="module")
def boxes(train_set: LvisDataset) -> dict[str, Any]:
    """The small model's box-head inputs and labels of every box of 24 training images."""
    torch.manual_seed(0)
    backend = TorchvisionMaskRCNN.build(train_set.num_classes, "small", 128)
    backend.module.train()
    images, targets = real_inputs([train_set[i] for i in range(24)], backend.device)
    pooled = backend.gt_box_head_inputs(images, targets)
    labels = torch.cat([t["labels"] for t in targets])
    layers = linear_layers([("box_head", backend.module.roi_heads.box_head),
                            ("box_predictor", backend.module.roi_heads.box_predictor)])
    return {"backend": backend, "pooled": pooled, "labels": labels, "layers": layers}


def _factors(boxes: dict[str, Any], rows: torch.Tensor) -> list[LayerFactors]:
    b = boxes
    return head_factors(b["backend"].head_losses, b["pooled"][rows], b["labels"][rows],
                        b["layers"])[1]


def _exact_grads(boxes: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """K x P: each box's loss gradient over the classifier's parameters, one backward each."""
    backend = boxes["backend"]
    params = backend.classifier_parameters()
    out = []
    for r in rows.tolist():
        loss = backend.head_losses(boxes["pooled"][[r]], boxes["labels"][[r]]).sum()
        out.append(flat(torch.autograd.grad(loss, params, allow_unused=True), params))
    return torch.stack(out)


def _split(boxes: dict[str, Any], label: int, cache_boxes: int = 6
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``label`` for the cache and, as candidates, the other boxes (any label, scored as
    ``label``: what a wrong-class candidate looks like)."""
    rows = torch.nonzero(boxes["labels"] == label).flatten()
    assert len(rows) > cache_boxes, "the fixture's images hold too few boxes of the class"
    return rows[:cache_boxes], torch.cat([rows[cache_boxes:],
                                          torch.nonzero(boxes["labels"] != label).flatten()])


def _relabelled(boxes: dict[str, Any], rows: torch.Tensor, label: int) -> dict[str, Any]:
    return {**boxes, "labels": boxes["labels"].clone().index_fill_(0, rows, label)}


def _label(boxes: dict[str, Any]) -> int:
    values, counts = torch.unique(boxes["labels"], return_counts=True)
    return int(values[counts.argmax()])


def test_one_backward_gives_each_box_its_exact_gradient(boxes: dict[str, Any]) -> None:
    rows = torch.arange(min(12, len(boxes["labels"])))
    factors = _factors(boxes, rows)
    assert [f.name for f in factors] == ["box_head.fc6", "box_head.fc7",
                                         "box_predictor.cls_score"]  # bbox_pred gets none
    exact = _exact_grads(boxes, rows)
    params = boxes["backend"].classifier_parameters()
    names = [n for n, p in boxes["backend"].module.roi_heads.named_parameters()
             if any(p is q for q in params)]
    start = 0
    for name, p in zip(names, params):
        part = exact[:, start:start + p.numel()].reshape(len(rows), *p.shape)
        start += p.numel()
        layer = ".".join(name.split(".")[:-1])
        f = next((f for f in factors if f.name == layer), None)
        if f is None:  # the box-regression layer: no gradient from a classification loss
            assert torch.count_nonzero(part) == 0, name
        elif name.endswith("weight"):
            torch.testing.assert_close(part, torch.einsum("ko,ki->koi", f.delta, f.x),
                                       rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(part, f.delta, rtol=1e-4, atol=1e-6)


def test_a_basis_spanning_the_boxes_makes_the_sketch_exact(boxes: dict[str, Any]) -> None:
    label = _label(boxes)
    cache_rows, cand_rows = _split(boxes, label)
    scored_as = _relabelled(boxes, cand_rows, label)
    exact = ClassGradientCaches(boxes["backend"].classifier_parameters())
    exact.update(7, _exact_grads(boxes, cache_rows).mean(0))
    want, want_norm = exact.scores(7, _exact_grads(scored_as, cand_rows))
    every = torch.cat([cache_rows, cand_rows])
    sketch = SketchedClassCaches(rank=len(every))
    sketch.set_basis(InputBasis.fit(_factors(boxes, every), rank=len(every)))
    assert sketch.update(7, _factors(boxes, cache_rows), step=3) is None
    got, got_norm = sketch.scores(7, _factors(scored_as, cand_rows))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert got_norm == pytest.approx(want_norm, rel=1e-4)
    assert sketch.age(7, 10) == 7 and sketch.age(8, 10) is None


@pytest.mark.parametrize("rank", [8])
def test_the_default_rank_keeps_the_exact_cosines_order(boxes: dict[str, Any], rank: int
                                                        ) -> None:
    label = _label(boxes)
    cache_rows, cand_rows = _split(boxes, label)
    scored_as = _relabelled(boxes, cand_rows, label)
    exact = ClassGradientCaches(boxes["backend"].classifier_parameters())
    exact.update(1, _exact_grads(boxes, cache_rows).mean(0))
    want, _ = exact.scores(1, _exact_grads(scored_as, cand_rows))
    others = torch.nonzero(boxes["labels"] != label).flatten()  # a basis fitted without it
    sketch = SketchedClassCaches(rank=rank)
    sketch.set_basis(InputBasis.fit(_factors(boxes, others[: len(others) // 2]), rank=rank))
    sketch.update(1, _factors(boxes, cache_rows))
    got, _ = sketch.scores(1, _factors(scored_as, cand_rows))
    pearson = np.corrcoef(got.numpy(), want.numpy())[0, 1]
    assert pearson >= 0.99, pearson
    floats = sketch.numbers_per_class([(f.x.shape[1], f.delta.shape[1])
                                       for f in _factors(boxes, cache_rows)], rank)
    assert floats * 4 < exact.nbytes / 50  # at least 50x smaller than the exact cache


def test_reexpression_and_the_checkpoint_round_trip(boxes: dict[str, Any]) -> None:
    label = _label(boxes)
    cache_rows, cand_rows = _split(boxes, label)
    every = torch.cat([cache_rows, cand_rows])
    first = InputBasis.fit(_factors(boxes, every), rank=len(every))
    later = InputBasis({n: v.flip(1) for n, v in first.bases.items()})  # same span, other order
    a = SketchedClassCaches(rank=len(every))
    a.set_basis(first, index=0)
    a.update(2, _factors(boxes, cache_rows), step=1)
    before = a.scores(2, _factors(boxes, cand_rows))[0]
    a.set_basis(later, index=1)  # re-expressed: the same caches seen through the new basis
    torch.testing.assert_close(a.scores(2, _factors(boxes, cand_rows))[0], before,
                               rtol=1e-4, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = SketchedClassCaches(rank=len(every))
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.basis_index == 1 and b.age(2, 5) == 4
    torch.testing.assert_close(b.scores(2, _factors(boxes, cand_rows))[0], before,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sketch_rank"):
        SketchedClassCaches(rank=4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="exact class caches"):
        b.load_state_dict(ClassGradientCaches(boxes["backend"].classifier_parameters())
                          .state_dict())


def test_a_non_finite_real_gradient_leaves_the_cache_untouched(boxes: dict[str, Any]) -> None:
    rows = torch.arange(4)
    caches = SketchedClassCaches(rank=4)
    caches.set_basis(InputBasis.fit(_factors(boxes, rows), rank=4))
    bad = [LayerFactors(f.name, f.x, f.delta * float("inf"), f.has_bias)
           for f in _factors(boxes, rows)]
    assert caches.update(3, bad) == "invalid_nan_real_grad"
    assert caches.get(3) is None and caches.scores(3, _factors(boxes, rows)) is None


def test_top_basis_is_orthonormal_and_signed_the_same_way() -> None:
    rows = torch.randn(30, 200, generator=torch.Generator().manual_seed(0))
    v = top_basis(rows, 8)
    torch.testing.assert_close(v.T @ v, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(top_basis(rows.clone(), 8), v)
    tall = torch.randn(300, 20, generator=torch.Generator().manual_seed(1))
    w = top_basis(tall, 5)  # the SVD route
    torch.testing.assert_close(w.T @ w, torch.eye(5), atol=1e-5, rtol=0)


def test_lvis_sized_caches_take_what_the_docs_say() -> None:
    # ResNet-50 FPN heads with 1203 classes: fc6 12544 -> 1024, fc7 1024 -> 1024,
    # cls_score 1024 -> 1204 (bbox_pred gets no classification gradient).
    layers = [(12544, 1024), (1024, 1024), (1024, 1204)]
    per_class = SketchedClassCaches.numbers_per_class(layers, 8)
    assert per_class == 43_860
    assert per_class * 4 * 1203 / 2**20 == pytest.approx(201.3, abs=0.1)


def test_stale_and_empty_classes_get_a_bounded_top_up(train_set: LvisDataset) -> None:
    from benchmarks._candidate_stream import real_cutouts
    from trainer.factory import build_trainer

    trainer = build_trainer(train_set, training={"batch_size": 2, "steps": 20,
                                                 "max_pastes_per_image": 3, "device": "cpu"},
                            selection={"granularity": "instance", "method": "composite",
                                       "quality_gates": {"mask_score": 0.0}, "topup_images": 1,
                                       "cache_max_age": 3}, seed=0)
    step = trainer.step_fn
    assert step.real_test_for(0, [5, 5, 6], covered={6}) == ([5], 1)  # 6 is in the images
    logs = trainer.train_on_candidates(real_cutouts(train_set, 24, seed=3,
                                                    mask_scores=True)).steps
    assert logs and all(log["topup_images"] <= 1 for log in logs)
    caches = trainer.selector.caches
    seen = sorted(caches.caches)
    assert seen and caches.basis is not None
    cid = seen[0]
    caches.updated_at[cid] = trainer.step - 10  # grown old
    assert step.real_test_for(trainer.step, [cid], covered=set()) == ([cid], 1)
    caches.updated_at[cid] = trainer.step - 1
    assert step.real_test_for(trainer.step, [cid], covered=set()) is None

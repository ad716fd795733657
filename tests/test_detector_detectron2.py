"""detectron2 Mask R-CNN backend: the same contract as the torchvision one.

Runs only where ``import detectron2`` works (see the README, "detectron2 backend").
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

detectron2 = pytest.importorskip(
    "detectron2", reason="detectron2 is not installed (optional backend; see the README section "
    "'detectron2 backend' to install it from source)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from trainer.backends import (  # noqa: E402
    GENERATED,
    REAL_FOREGROUND,
    build_backend,
)
from trainer.backends.detectron2_maskrcnn import Detectron2MaskRCNN  # noqa: E402
from trainer.datasets import LvisDataset  # noqa: E402

from tests.conftest import detector_batch  # noqa: E402

TERMS = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


@pytest.fixture(scope="module")
def train_set(builtin_data: Path) -> LvisDataset:
    return LvisDataset(builtin_data, "train.json", max_images=8)


def test_loss_pieces_sum_to_the_stock_detectron2_loss(train_set: LvisDataset) -> None:
    torch.manual_seed(0)
    backend = Detectron2MaskRCNN.build(train_set.num_classes, "small", 128)
    stock = build_model(backend.cfg)  # detectron2's own registry-built model
    stock.load_state_dict(copy.deepcopy(backend.module.state_dict()))
    assert list(stock.state_dict()) == list(backend.module.state_dict())
    stock.train()
    backend.module.train()
    images, targets = detector_batch(train_set)
    inputs = backend._inputs(images, targets)
    torch.manual_seed(5)
    with EventStorage(0):
        expected = stock(inputs)
    torch.manual_seed(5)
    split = backend.losses(images, targets)
    assert set(expected) == set(TERMS) == set(split.terms)
    for term in TERMS:
        total = (split.real[term] + split.generated[term]).detach()
        assert float(total) == pytest.approx(float(expected[term].detach()), rel=1e-5,
                                             abs=1e-7), term
    assert float(split.generated["loss_cls"].detach()) > 0
    assert float(split.pieces[REAL_FOREGROUND]["loss_mask"].detach()) > 0


def test_generated_part_is_empty_without_generated_instances(train_set: LvisDataset) -> None:
    torch.manual_seed(0)
    backend = build_backend("detectron2", train_set.num_classes, "small", 128)
    backend.module.train()
    split = backend.losses(*detector_batch(train_set, flags="none"))
    assert all(float(split.pieces[GENERATED][t].detach()) == 0.0 for t in TERMS)
    split = backend.losses(*detector_batch(train_set, flags="all"))
    assert float(split.pieces[REAL_FOREGROUND]["loss_cls"].detach()) == 0.0
    assert float(split.pieces[GENERATED]["loss_mask"].detach()) > 0


def test_real_classification_loss_and_predict(train_set: LvisDataset) -> None:
    torch.manual_seed(0)
    backend = build_backend("detectron2", train_set.num_classes, "small", 128)
    backend.module.train()
    images, targets = detector_batch(train_set, flags="none")
    loss = backend.real_classification_loss(images, targets)
    assert float(loss.detach()) == pytest.approx(np.log(train_set.num_classes + 1), rel=0.3)
    named = dict(backend.module.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    assert all(grads[n] is None for n in named if n.startswith("proposal_generator."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
               if n.startswith("backbone.bottom_up"))
    out = backend.predict(images)
    assert backend.module.training
    for det, img in zip(out, images):
        n = det["boxes"].shape[0]
        assert det["masks"].shape == (n, *img.shape[-2:]) and det["masks"].dtype == torch.bool
        if n:
            assert 1 <= int(det["labels"].min()) and int(det["labels"].max()) <= \
                train_set.num_classes


@pytest.mark.parametrize("granularity", ["batch", "instance"])
def test_trainer_runs_bsgal_on_the_detectron2_backend(train_set: LvisDataset,
                                                      granularity: str) -> None:
    from trainer.factory import build_trainer

    trainer = build_trainer(train_set, training={"backend": "detectron2", "arch": "small",
                                                 "batch_size": 2, "device": "cpu"},
                            selection={"method": "bsgal", "granularity": granularity,
                                       "real_batch_size": 2})
    sample = train_set[0]
    k = int(np.argmax(sample["masks"].sum(axis=(1, 2))))
    rows = [{"sample_id": f"d{i}", "class_id": int(sample["category_ids"][k]),
             "image": sample["image"], "mask": sample["masks"][k], "status": "ok"}
            for i in range(3)]
    result = trainer.train_on_candidates(rows)
    assert len(result.decisions) == 3 and trainer.step >= 1
    assert {d["reason"] for d in result.decisions} <= {"accepted", "rejected_score",
                                                       "invalid_not_visible"}
    assert any(d["reason"] in ("accepted", "rejected_score") for d in result.decisions)

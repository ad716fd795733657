"""torchvision Mask R-CNN backend: split losses against the stock model, real loss, predict."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models.detection.roi_heads as tv_roi_heads
import torchvision.models.detection.rpn as tv_rpn

from trainer.backends import GENERATED, GROUPS, REAL_FOREGROUND
from trainer.backends.torchvision_arch import build_maskrcnn
from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
from trainer.datasets import LvisDataset

from tests.conftest import detector_batch

TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@pytest.fixture(scope="module")
def train_set(builtin_data: Path) -> LvisDataset:
    return LvisDataset(builtin_data, "train.json", max_images=16)


def _stock_and_split(num_classes: int):
    torch.manual_seed(0)
    stock = build_maskrcnn(num_classes, "small", 128)
    split = TorchvisionMaskRCNN(copy.deepcopy(stock), num_classes)
    stock.train()
    split.module.train()
    return stock, split


def test_loss_pieces_sum_to_the_stock_loss(train_set: LvisDataset) -> None:
    stock, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set)
    stock_targets = [{k: v for k, v in t.items() if k != "generated"} for t in targets]
    torch.manual_seed(123)
    expected = stock(images, stock_targets)
    torch.manual_seed(123)
    losses = split.losses(images, targets)
    assert set(expected) == set(TERMS) == set(losses.terms)
    real, generated = losses.real, losses.generated
    for term in TERMS:
        total = (real[term] + generated[term]).detach()
        assert float(total) == pytest.approx(float(expected[term].detach()), rel=1e-5,
                                             abs=1e-7), term
    # Half of the instances are generated: both parts carry classification and mask loss.
    for part in (real, generated):
        assert float(part["loss_classifier"].detach()) > 0 and float(part["loss_mask"].detach()) > 0


def test_generated_part_is_empty_without_generated_instances(train_set: LvisDataset) -> None:
    _, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set, flags="none")
    losses = split.losses(images, targets)
    for term in TERMS:
        assert float(losses.pieces[GENERATED][term].detach()) == 0.0
        assert float(losses.pieces["generated_background"][term].detach()) == 0.0
    images, targets = detector_batch(train_set, flags="all")
    losses = split.losses(images, targets)
    for term in ("loss_classifier", "loss_box_reg", "loss_mask"):
        assert float(losses.pieces[REAL_FOREGROUND][term].detach()) == 0.0
        assert float(losses.pieces[GENERATED][term].detach()) > 0.0
    # Every piece is attached to the graph, even the empty ones.
    assert all(v.requires_grad for g in GROUPS for v in losses.pieces[g].values())


def test_generated_classification_gradient_reaches_backbone_not_mask_head(
        train_set: LvisDataset) -> None:
    _, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set)
    loss = split.losses(images, targets, score_only=True).generated["loss_classifier"]
    module = split.module
    named = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    by_name = dict(zip(named, grads))
    assert by_name["backbone.body.conv1.weight"].abs().sum() > 0
    assert by_name["roi_heads.box_predictor.cls_score.weight"].abs().sum() > 0
    assert all(by_name[n] is None for n in named if n.startswith("roi_heads.mask_"))


def test_real_classification_loss_uses_ground_truth_boxes_only(train_set: LvisDataset) -> None:
    _, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set, flags="none")
    loss = split.real_classification_loss(images, targets)
    num_classes = train_set.num_classes
    # An untrained classifier is near-uniform over K+1 classes.
    assert float(loss.detach()) == pytest.approx(np.log(num_classes + 1), rel=0.3)
    named = dict(split.module.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    assert grads["roi_heads.box_head.fc6.weight"].abs().sum() > 0
    assert grads["backbone.fpn.layer_blocks.0.0.weight"].abs().sum() > 0
    assert all(grads[n] is None for n in named if n.startswith(("rpn.", "roi_heads.mask_")))
    # Relabelling the boxes changes the loss: it is a classification loss on those boxes.
    shifted = [dict(t, labels=(t["labels"] % num_classes) + 1) for t in targets]
    relabelled = split.real_classification_loss(images, shifted).detach()
    assert float(relabelled) != pytest.approx(float(loss.detach()))


def test_torchvision_module_globals_untouched(train_set: LvisDataset) -> None:
    before = (tv_roi_heads.fastrcnn_loss, tv_roi_heads.maskrcnn_loss,
              tv_roi_heads.RoIHeads.forward, tv_rpn.RegionProposalNetwork.forward)
    stock, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set)
    split.losses(images, targets)
    after = (tv_roi_heads.fastrcnn_loss, tv_roi_heads.maskrcnn_loss,
             tv_roi_heads.RoIHeads.forward, tv_rpn.RegionProposalNetwork.forward)
    assert before == after
    # A stock model still returns stock keys after the split one ran.
    stock_targets = [{k: v for k, v in t.items() if k != "generated"} for t in targets]
    assert set(stock(images, stock_targets)) == set(TERMS)


def test_state_dict_keys_match_stock_model(train_set: LvisDataset) -> None:
    stock, split = _stock_and_split(train_set.num_classes)
    assert list(stock.state_dict()) == list(split.module.state_dict())


def test_predict_layout(train_set: LvisDataset) -> None:
    _, split = _stock_and_split(train_set.num_classes)
    images, _ = detector_batch(train_set)
    out = split.predict(images)
    assert len(out) == 4 and split.module.training  # mode restored
    for det, img in zip(out, images):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["masks"].dtype == torch.bool
        assert det["masks"].shape == (n, *img.shape[-2:])
        if n:
            assert int(det["labels"].min()) >= 1


def test_losses_refuse_eval_mode_and_bad_flags(train_set: LvisDataset) -> None:
    _, split = _stock_and_split(train_set.num_classes)
    images, targets = detector_batch(train_set)
    bad = [dict(t, generated=t["generated"][:-1]) if len(t["generated"]) > 1 else t
           for t in targets]
    with pytest.raises(ValueError, match="one flag per box"):
        split.losses(images, bad)
    split.module.eval()
    with pytest.raises(RuntimeError, match="train mode"):
        split.losses(images, targets)


def test_resnet50_fpn_and_bfloat16_autocast_build_and_split(train_set: LvisDataset) -> None:
    torch.manual_seed(0)
    backend = TorchvisionMaskRCNN.build(train_set.num_classes, "resnet50_fpn", image_size=128,
                                        amp=True)
    module = backend.module
    assert module.transform.min_size == (128,) and module.roi_heads.detections_per_img == 300
    assert isinstance(module.backbone.body.bn1, torch.nn.BatchNorm2d)  # not frozen: no weights
    module.train()
    images, targets = detector_batch(train_set)
    losses = backend.losses(images[:1], targets[:1])
    assert set(losses.terms) == set(TERMS)
    for group in GROUPS:
        for value in losses.pieces[group].values():
            assert value.dtype == torch.float32 and torch.isfinite(value)
    assert float(losses.generated["loss_classifier"].detach()) > 0
    with pytest.raises(ValueError, match="arch 'tiny' is unknown"):
        TorchvisionMaskRCNN.build(3, "tiny")

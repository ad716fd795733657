"""The detectron2 Mask R-CNN backend (same contract as the torchvision one).

Importing this module needs detectron2 (see the README for installing it from source). The model
is detectron2's ``GeneralizedRCNN`` built from its model-zoo config
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`` without weights, so the norm is plain
BatchNorm (``FrozenBN`` would freeze random statistics) and every stage trains
(``FREEZE_AT=0``). Its RPN and RoI heads are `SplitRPN` and `SplitStandardROIHeads`: subclasses
that run detectron2's own labelling and sampling in the same order (same random numbers, same
samples) and return each loss term per group of :mod:`trainer.backends.split_losses`. The
model is assembled from these parts directly: nothing is added to detectron2's registries.

``arch``:

``resnet50_fpn``
    the model-zoo R50-FPN, LVIS-sized (300 detections at score >= 1e-4), shorter side
    ``image_size``.
``small``
    R18-FPN with a 64-channel FPN, 256-d box head, a two-conv 64-channel mask head and 64
    sampled anchors/RoIs per image (the CPU configuration of the torchvision backend, as close
    as detectron2's configs allow).

Loss names are detectron2's: ``loss_cls``, ``loss_box_reg``, ``loss_mask``, ``loss_rpn_cls``,
``loss_rpn_loc``. Supported: softmax cross-entropy and smooth-L1 box losses (detectron2's
defaults); sigmoid/federated classification or GIoU box losses raise ``NotImplementedError``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import cat
from detectron2.modeling import GeneralizedRCNN, build_backbone
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import StandardROIHeads, select_foreground_proposals
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from fvcore.nn import smooth_l1_loss
from torch import Tensor

from trainer.backends.base import (
    ModuleBackend,
    add_per_group,
    generated_flags,
    group_codes,
    real_background_groups,
    sample_groups,
)
from trainer.backends.split_losses import GROUPS, SplitLosses

CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
ARCHS = ("small", "resnet50_fpn")


def _gt_generated(inst: Instances) -> Tensor:
    """The ground truth's ``gt_generated`` flags (all False when absent)."""
    if inst.has("gt_generated"):
        return inst.gt_generated
    return torch.zeros(len(inst), dtype=torch.bool, device=inst.gt_boxes.device)


def config_path() -> str:
    """The model-zoo config file inside the installed detectron2 (no pkg_resources needed)."""
    root = importlib.util.find_spec("detectron2").submodule_search_locations[0]
    path = os.path.join(root, "model_zoo", "configs", CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: install detectron2 with its model-zoo "
                                "configs (pip install from the source tree, see the README)")
    return path


def build_config(num_classes: int, arch: str = "small", image_size: int = 128,
                 device: str = "cpu") -> Any:
    """detectron2 config of ``arch`` for ``num_classes`` (background excluded), no weights."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is unknown for the detectron2 backend; use one of "
                         f"{ARCHS}")
    cfg = get_cfg()
    cfg.merge_from_file(config_path())
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.INPUT.MIN_SIZE_TEST = image_size
    cfg.INPUT.MAX_SIZE_TEST = int(round(image_size * 1333 / 800))
    cfg.VIS_PERIOD = 0
    if arch == "small":
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.FPN.OUT_CHANNELS = 64
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
        cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 256
        cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 1
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 64
        cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
        cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 1
        cfg.TEST.DETECTIONS_PER_IMAGE = 50
        cfg.INPUT.MAX_SIZE_TEST = image_size
    else:
        cfg.TEST.DETECTIONS_PER_IMAGE = 300
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 1e-4
    cfg.freeze()
    return cfg


class SplitRPN(RPN):
    """detectron2 ``RPN`` whose training losses are split by the ground truth each anchor matched.

    Ground truth carries ``gt_generated`` (bool per instance).
    """

    def _label_with_groups(self, anchors: list[Boxes], gt_instances: list[Instances]):
        """The stock ``label_and_sample_anchors`` plus each anchor's group code."""
        anchors_all = Boxes.cat(anchors)
        labels, matched_boxes, groups = [], [], []
        for inst in gt_instances:
            gt_boxes = inst.gt_boxes
            quality = pairwise_iou(gt_boxes, anchors_all)
            matched, image_labels = self.anchor_matcher(quality)
            image_labels = image_labels.to(device=gt_boxes.device)
            if self.anchor_boundary_thresh >= 0:
                inside = anchors_all.inside_box(inst.image_size, self.anchor_boundary_thresh)
                image_labels[~inside] = -1
            image_labels = self._subsample_labels(image_labels)
            groups.append(sample_groups(quality, matched, image_labels == 1,
                                        _gt_generated(inst)))
            if len(gt_boxes) == 0:
                matched_boxes.append(torch.zeros_like(anchors_all.tensor))
            else:
                matched_boxes.append(gt_boxes[matched].tensor)
            labels.append(image_labels)
        return labels, matched_boxes, groups

    def _split_losses(self, anchors: list[Boxes], objectness: list[Tensor], labels: list[Tensor],
                      deltas: list[Tensor], gt_boxes: list[Tensor], groups: list[Tensor]
                      ) -> dict[str, Tensor]:
        if self.box_reg_loss_type != "smooth_l1":
            raise NotImplementedError(f"split RPN losses support smooth_l1 box loss, not "
                                      f"{self.box_reg_loss_type!r}")
        labels_all = torch.stack(labels)
        groups_all = torch.stack(groups)
        anchors_all = type(anchors[0]).cat(anchors).tensor
        gt_deltas = torch.stack([self.box2box_transform.get_deltas(anchors_all, b)
                                 for b in gt_boxes])
        deltas_all = cat(deltas, dim=1)
        loc = smooth_l1_loss(deltas_all, gt_deltas, self.smooth_l1_beta, reduction="none").sum(-1)
        loc = torch.where(labels_all == 1, loc, torch.zeros_like(loc))
        logits = cat(objectness, dim=1)
        valid = labels_all >= 0
        bce = F.binary_cross_entropy_with_logits(logits, labels_all.clamp(min=0).float(),
                                                 reduction="none")
        bce = torch.where(valid, bce, torch.zeros_like(bce))
        normalizer = self.batch_size_per_image * len(labels)
        out: dict[str, Tensor] = {}
        add_per_group(bce, groups_all, normalizer, "loss_rpn_cls", out,
                      self.loss_weight.get("loss_rpn_cls", 1.0))
        add_per_group(loc, groups_all, normalizer, "loss_rpn_loc", out,
                      self.loss_weight.get("loss_rpn_loc", 1.0))
        return out

    def forward(self, images, features, gt_instances=None):
        if not self.training:
            return super().forward(images, features, gt_instances)
        feature_list = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feature_list)
        objectness, deltas = self.rpn_head(feature_list)
        objectness = [s.permute(0, 2, 3, 1).flatten(1) for s in objectness]
        deltas = [x.view(x.shape[0], -1, self.anchor_generator.box_dim, x.shape[-2],
                         x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        labels, gt_boxes, groups = self._label_with_groups(anchors, gt_instances)
        losses = self._split_losses(anchors, objectness, labels, deltas, gt_boxes, groups)
        proposals = self.predict_proposals(anchors, objectness, deltas, images.image_sizes)
        return proposals, losses


class SplitStandardROIHeads(StandardROIHeads):
    """detectron2 ``StandardROIHeads`` with losses split by the ground truth each RoI matched."""

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        sampled = super().label_and_sample_proposals(proposals, targets)
        for props, target in zip(sampled, targets):
            if len(target) == 0:
                props.split_group = real_background_groups(len(props),
                                                           props.proposal_boxes.device)
                continue
            quality = pairwise_iou(target.gt_boxes, props.proposal_boxes)
            positive = props.gt_classes != self.num_classes
            # Positives carry their matched ground truth's flag (copied like every gt_ field).
            matched_generated = (props.gt_generated if props.has("gt_generated")
                                 else torch.zeros_like(positive))
            props.split_group = group_codes(quality, positive, matched_generated,
                                            _gt_generated(target))
        return sampled

    def _forward_box(self, features, proposals):
        if not self.training:
            return super()._forward_box(features, proposals)
        predictor = self.box_predictor
        if predictor.use_sigmoid_ce or predictor.use_fed_loss:
            raise NotImplementedError("split box losses support softmax cross-entropy; the "
                                      "config asks for sigmoid/federated loss")
        if predictor.box_reg_loss_type != "smooth_l1":
            raise NotImplementedError(f"split box losses support smooth_l1, not "
                                      f"{predictor.box_reg_loss_type!r}")
        feats = [features[f] for f in self.box_in_features]
        box_features = self.box_head(self.box_pooler(feats, [p.proposal_boxes
                                                             for p in proposals]))
        scores, deltas = predictor(box_features)
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        groups = cat([p.split_group for p in proposals], dim=0)
        proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
        gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                        for p in proposals], dim=0)
        num = max(gt_classes.numel(), 1)
        out: dict[str, Tensor] = {}
        weight = predictor.loss_weight
        ce = F.cross_entropy(scores, gt_classes, reduction="none")
        add_per_group(ce, groups, num, "loss_cls", out, weight.get("loss_cls", 1.0))
        foreground = (gt_classes >= 0) & (gt_classes < self.num_classes)
        box_dim = proposal_boxes.shape[1]
        if deltas.shape[1] == box_dim:
            chosen = deltas
        else:
            classes = torch.where(foreground, gt_classes, torch.zeros_like(gt_classes))
            chosen = deltas.view(-1, self.num_classes, box_dim)[
                torch.arange(len(classes), device=classes.device), classes]
        gt_deltas = predictor.box2box_transform.get_deltas(proposal_boxes, gt_boxes)
        reg = smooth_l1_loss(chosen, gt_deltas, predictor.smooth_l1_beta, reduction="none").sum(1)
        reg = torch.where(foreground, reg, torch.zeros_like(reg))
        add_per_group(reg, groups, num, "loss_box_reg", out, weight.get("loss_box_reg", 1.0))
        return out

    def _forward_mask(self, features, instances):
        if not self.training or not self.mask_on:
            return super()._forward_mask(features, instances)
        instances, _ = select_foreground_proposals(instances, self.num_classes)
        feats = [features[f] for f in self.mask_in_features]
        pooled = self.mask_pooler(feats, [x.proposal_boxes for x in instances])
        logits = self.mask_head.layers(pooled)
        side = logits.size(2)
        nonempty = [x for x in instances if len(x)]
        if not nonempty:
            zero = logits.sum() * 0
            return {f"{g}/loss_mask": zero for g in GROUPS}
        targets = cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, side)
                       .to(logits.device) for x in nonempty], dim=0).float()
        groups = cat([x.split_group for x in nonempty], dim=0)
        if logits.size(1) == 1:
            chosen = logits[:, 0]
        else:
            classes = cat([x.gt_classes for x in nonempty], dim=0)
            chosen = logits[torch.arange(len(classes), device=classes.device), classes]
        per_roi = F.binary_cross_entropy_with_logits(chosen, targets,
                                                     reduction="none").sum(dim=(1, 2))
        out: dict[str, Tensor] = {}
        add_per_group(per_roi, groups, targets.numel(), "loss_mask", out,
                      float(self.mask_head.loss_weight))
        return out

    def gt_box_classification_loss(self, features: dict[str, Tensor],
                                    targets: list[Instances], reduction: str = "mean") -> Tensor:
        """Softmax cross-entropy of the box classifier on the ground-truth boxes as RoIs (mean;
        ``reduction="none"``: one per box, in order)."""
        feats = [features[f] for f in self.box_in_features]
        scores, _ = self.box_predictor(self.box_head(self.box_pooler(
            feats, [t.gt_boxes for t in targets])))
        classes = cat([t.gt_classes for t in targets], dim=0)
        if reduction == "none":
            return F.cross_entropy(scores, classes, reduction="none")
        if classes.numel() == 0:
            return scores.sum() * 0
        return F.cross_entropy(scores, classes)


def build_split_model(cfg: Any) -> GeneralizedRCNN:
    """``GeneralizedRCNN`` assembled from the config with the split RPN and RoI heads."""
    backbone = build_backbone(cfg)
    shape = backbone.output_shape()
    model = GeneralizedRCNN(
        backbone=backbone,
        proposal_generator=SplitRPN(cfg, shape),
        roi_heads=SplitStandardROIHeads(cfg, shape),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        vis_period=0,
    )
    return model.to(torch.device(cfg.MODEL.DEVICE))


class Detectron2MaskRCNN(ModuleBackend):
    """`DetectorBackend` over detectron2's Mask R-CNN (see :mod:`trainer.backends.base`).

    Inputs are the contract's RGB [0, 1] tensors; they are resized here (shorter side
    ``image_size``, longer side at most ``image_size * 1333 / 800``, as detectron2's test-time
    resize) and converted to detectron2's BGR 0-255 layout. Labels 1..K map to detectron2
    classes 0..K-1.
    """

    name = "detectron2"
    classification_term = "loss_cls"

    module: GeneralizedRCNN

    def __init__(self, cfg: Any, num_classes: int, arch: str = "custom",
                 amp: bool = False) -> None:
        super().__init__(build_split_model(cfg), num_classes, arch, cfg.MODEL.DEVICE, amp)
        self.cfg = cfg
        self.min_size = int(cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(cfg.INPUT.MAX_SIZE_TEST)
        self._storage_iter = 0

    @classmethod
    def build(cls, num_classes: int, arch: str = "small", image_size: int = 128,
              device: torch.device | str = "cpu", amp: bool = False) -> Detectron2MaskRCNN:
        return cls(build_config(num_classes, arch, image_size, str(device)), num_classes, arch,
                   amp)

    def _scale(self, height: int, width: int) -> float:
        scale = self.min_size / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return scale

    def _inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> list[dict[str, Any]]:
        out = []
        for i, image in enumerate(images):
            height, width = image.shape[-2:]
            scale = self._scale(height, width)
            size = (int(round(height * scale)), int(round(width * scale)))
            resized = image if size == (height, width) else F.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False)[0]
            entry: dict[str, Any] = {"image": resized.flip(0) * 255.0, "height": height,
                                     "width": width}
            if targets is not None:
                t = targets[i]
                inst = Instances(size)
                inst.gt_boxes = Boxes(t["boxes"].float() * torch.tensor(
                    [size[1] / width, size[0] / height] * 2, device=t["boxes"].device))
                inst.gt_classes = t["labels"] - 1
                masks = t["masks"].bool()
                if masks.shape[-2:] != size:
                    masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
                inst.gt_masks = BitMasks(masks)
                inst.gt_generated = generated_flags(t)
                entry["instances"] = inst
            out.append(entry)
        return out

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]], *,
               score_only: bool = False) -> SplitLosses:
        model = self._loss_model(score_only)
        with EventStorage(self._storage_iter), self._autocast():
            flat = model(self._inputs(images, targets))
        return SplitLosses.from_flat(flat)

    def real_classification_loss(self, images: list[Tensor],
                                 targets: list[dict[str, Tensor]]) -> Tensor:
        """Box-classifier cross-entropy on the ground-truth boxes (the reference's real loss)."""
        return self._gt_box_loss(images, targets, "mean")

    def gt_box_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """N per-box cross-entropies on the ground-truth boxes, in order (attached)."""
        return self._gt_box_loss(images, targets, "none")

    @torch.no_grad()
    def gt_box_head_inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                           ) -> Tensor:
        """N x C x 7 x 7: the box head's pooled input at each ground-truth box, without grad."""
        model = self.module
        inputs = self._inputs(images, targets)
        with self._autocast():
            batch = model.preprocess_image(inputs)
            features = model.backbone(batch.tensor)
            heads = model.roi_heads
            pooled = heads.box_pooler([features[f] for f in heads.box_in_features],
                                      [x["instances"].to(self.device).gt_boxes for x in inputs])
        return pooled.float()

    def head_losses(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """N cross-entropies of box head + class predictor for training ``labels`` (1..K;
        detectron2's classes are 0-based with the background last)."""
        heads = self.module.roi_heads
        scores, _ = heads.box_predictor(heads.box_head(pooled))
        return F.cross_entropy(scores.float(), labels - 1, reduction="none")

    def _gt_box_loss(self, images: list[Tensor], targets: list[dict[str, Tensor]],
                     reduction: str) -> Tensor:
        model = self.module
        inputs = self._inputs(images, targets)
        with self._autocast():
            batch = model.preprocess_image(inputs)
            features = model.backbone(batch.tensor)
            loss = model.roi_heads.gt_box_classification_loss(
                features, [x["instances"].to(self.device) for x in inputs], reduction)
        return loss.float()

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        with self._eval_mode():
            outputs = self.module(self._inputs(images))
        results = []
        for out in outputs:
            inst = out["instances"]
            results.append({
                "boxes": inst.pred_boxes.tensor.float(),
                "scores": inst.scores.float(),
                "labels": inst.pred_classes.to(torch.int64) + 1,
                "masks": inst.pred_masks.bool(),
            })
        return results

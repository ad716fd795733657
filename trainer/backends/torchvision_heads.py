"""torchvision RPN and RoI heads that return their losses split by real/generated ground truth.

`SplitRegionProposalNetwork` and `SplitRoIHeads` subclass torchvision's ``RegionProposalNetwork``
and ``RoIHeads``. At inference they are the stock modules (``super().forward``). In training they
run the same sampling as the stock code, in the same order (so they draw the same random numbers
and pick the same anchors/RoIs), additionally record which ground truth each sampled anchor/RoI
matched, and return every loss term per group of :mod:`trainer.backends.split_losses` as
``{"<group>/<term>": 0-dim tensor}``. Summed over groups, each term equals the stock term.

Targets may carry ``generated``: bool [N] (True for a pasted instance); missing means all real.
The group labelling itself (`trainer.backends.base.sample_groups`) is shared with detectron2.
Nothing of torchvision is patched: the loss functions here are separate functions called by the
subclasses, and the stock modules keep working unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    concat_box_prediction_layers,
)
from torchvision.ops import boxes as box_ops

from trainer.backends.base import (
    add_per_group,
    generated_flags,
    real_background_groups,
    sample_groups,
)
from trainer.backends.split_losses import GROUPS


def split_fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                        regression_targets: list[Tensor], groups: list[Tensor]
                        ) -> dict[str, Tensor]:
    """torchvision's ``fastrcnn_loss`` per group.

    Args:
        class_logits: R x (K+1). box_regression: R x (K+1)*4.
        labels, regression_targets, groups: per image, the sampled RoIs' class (0 = background),
            4 regression targets and group code; R sampled RoIs in all.

    Returns:
        ``"<group>/loss_classifier"`` (cross-entropy summed over the group / R) and
        ``"<group>/loss_box_reg"`` (smooth L1, beta 1/9, over positives of the group / R).
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    groups_all = torch.cat(groups, dim=0)
    num = labels_all.numel()
    out: dict[str, Tensor] = {}
    cross_entropy = F.cross_entropy(class_logits, labels_all, reduction="none")
    add_per_group(cross_entropy, groups_all, num, "loss_classifier", out)
    rows = class_logits.shape[0]
    box_regression = box_regression.reshape(rows, box_regression.size(-1) // 4, 4)
    chosen = box_regression[torch.arange(rows, device=labels_all.device), labels_all]
    smooth_l1 = F.smooth_l1_loss(chosen, targets_all, beta=1 / 9, reduction="none").sum(dim=1)
    smooth_l1 = torch.where(labels_all > 0, smooth_l1, torch.zeros_like(smooth_l1))
    add_per_group(smooth_l1, groups_all, num, "loss_box_reg", out)
    return out


def split_maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                        gt_labels: list[Tensor], matched_idxs: list[Tensor],
                        groups: list[Tensor]) -> dict[str, Tensor]:
    """torchvision's ``maskrcnn_loss`` per group.

    Args:
        mask_logits: P x (K+1) x M x M for the P positive RoIs.
        proposals, matched_idxs, groups: per image, the positive RoIs (XYXY), their matched
            ground truth and group code. gt_masks: per image, N x H x W. gt_labels: per image, N.

    Returns:
        ``"<group>/loss_mask"``: binary cross-entropy summed over the group's pixels, divided by
        P * M * M (the stock mean's denominator).
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, matched_idxs)], dim=0)
    targets = torch.cat([project_masks_on_boxes(m, p, i, size)
                         for m, p, i in zip(gt_masks, proposals, matched_idxs)], dim=0)
    groups_all = torch.cat(groups, dim=0)
    out: dict[str, Tensor] = {}
    if targets.numel() == 0:
        zero = mask_logits.sum() * 0
        return {f"{name}/loss_mask": zero for name in GROUPS}
    rows = torch.arange(labels.shape[0], device=labels.device)
    per_roi = F.binary_cross_entropy_with_logits(mask_logits[rows, labels], targets,
                                                 reduction="none").sum(dim=(1, 2))
    add_per_group(per_roi, groups_all, targets.numel(), "loss_mask", out)
    return out


class SplitRoIHeads(RoIHeads):
    """``RoIHeads`` whose training losses are split by the ground truth each RoI matched."""

    @classmethod
    def from_stock(cls, heads: RoIHeads) -> SplitRoIHeads:
        """A split version sharing ``heads``' submodules (same parameters) and settings."""
        split = cls(
            box_roi_pool=heads.box_roi_pool,
            box_head=heads.box_head,
            box_predictor=heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
        )
        split.proposal_matcher.allow_low_quality_matches = (
            heads.proposal_matcher.allow_low_quality_matches
        )
        return split

    def sample_rois(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """The stock ``select_training_samples`` plus the group code of each sampled RoI.

        Returns:
            proposals (per image, R_i x 4), matched_idxs (R_i), labels (R_i),
            regression_targets (R x 4 concatenated per image), groups (per image, R_i).
        """
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        gt_generated = [generated_flags(t) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels, groups = [], [], []
        for props, boxes, classes, generated in zip(proposals, gt_boxes, gt_labels, gt_generated):
            if boxes.numel() == 0:
                n = props.shape[0]
                matched_idxs.append(torch.zeros(n, dtype=torch.int64, device=device))
                labels.append(torch.zeros(n, dtype=torch.int64, device=device))
                groups.append(real_background_groups(n, device))
                continue
            quality = box_ops.box_iou(boxes, props)
            matched = self.proposal_matcher(quality)
            clamped = matched.clamp(min=0)
            image_labels = classes[clamped].to(dtype=torch.int64)
            image_labels[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
            image_labels[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(clamped)
            labels.append(image_labels)
            groups.append(sample_groups(quality, clamped, image_labels > 0, generated))
        sampled = self.subsample(labels)
        matched_gt_boxes = []
        for i, keep in enumerate(sampled):
            proposals[i] = proposals[i][keep]
            labels[i] = labels[i][keep]
            matched_idxs[i] = matched_idxs[i][keep]
            groups[i] = groups[i][keep]
            boxes = gt_boxes[i]
            if boxes.numel() == 0:
                boxes = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(boxes[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets, groups

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: Optional[list[dict[str, Tensor]]] = None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, matched_idxs, labels, regression_targets, groups = self.sample_rois(
            proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = split_fastrcnn_loss(class_logits, box_regression, labels, regression_targets,
                                     groups)
        if self.has_mask():
            positive = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, positive)]
            mask_matched = [m[i] for m, i in zip(matched_idxs, positive)]
            mask_groups = [g[i] for g, i in zip(groups, positive)]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals,
                                                              image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            losses.update(split_maskrcnn_loss(
                mask_logits, mask_proposals, [t["masks"] for t in targets],
                [t["labels"] for t in targets], mask_matched, mask_groups))
        return [], losses

    def gt_box_classification_loss(self, features: dict[str, Tensor],
                                   image_shapes: list[tuple[int, int]],
                                   targets: list[dict[str, Tensor]],
                                   reduction: str = "mean") -> Tensor:
        """Cross-entropy of the box classifier on the ground-truth boxes as RoIs.

        The reference's real "test" loss: no proposals, no background RoIs, classification
        only. ``reduction="mean"``: mean over all ground-truth boxes of the batch, 0 (attached)
        when there are none; ``"none"``: N per-box losses, the targets' boxes concatenated in
        order.
        """
        boxes = [t["boxes"].to(next(iter(features.values())).dtype) for t in targets]
        labels = torch.cat([t["labels"] for t in targets])
        box_features = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        class_logits, _ = self.box_predictor(box_features)
        if reduction == "none":
            return F.cross_entropy(class_logits, labels, reduction="none")
        if labels.numel() == 0:
            return class_logits.sum() * 0
        return F.cross_entropy(class_logits, labels)


class SplitRegionProposalNetwork(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose training losses are split like `SplitRoIHeads`'."""

    @classmethod
    def from_stock(cls, rpn: RegionProposalNetwork) -> SplitRegionProposalNetwork:
        """A split version sharing ``rpn``'s submodules (same parameters) and settings."""
        return cls(
            anchor_generator=rpn.anchor_generator,
            head=rpn.head,
            fg_iou_thresh=rpn.proposal_matcher.high_threshold,
            bg_iou_thresh=rpn.proposal_matcher.low_threshold,
            batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
            positive_fraction=rpn.fg_bg_sampler.positive_fraction,
            pre_nms_top_n=dict(rpn._pre_nms_top_n),
            post_nms_top_n=dict(rpn._post_nms_top_n),
            nms_thresh=rpn.nms_thresh,
            score_thresh=rpn.score_thresh,
        )

    def assign_with_groups(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]):
        """The stock ``assign_targets_to_anchors`` plus each anchor's group code."""
        labels, matched_gt_boxes, groups = [], [], []
        for anchors_in_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            device = anchors_in_image.device
            n = anchors_in_image.shape[0]
            if gt_boxes.numel() == 0:
                matched_gt_boxes.append(torch.zeros(anchors_in_image.shape, dtype=torch.float32,
                                                    device=device))
                labels.append(torch.zeros((n,), dtype=torch.float32, device=device))
                groups.append(real_background_groups(n, device))
                continue
            quality = self.box_similarity(gt_boxes, anchors_in_image)
            matched = self.proposal_matcher(quality)
            clamped = matched.clamp(min=0)
            matched_gt_boxes.append(gt_boxes[clamped])
            image_labels = (matched >= 0).to(dtype=torch.float32)
            image_labels[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
            image_labels[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
            groups.append(sample_groups(quality, clamped, image_labels > 0,
                                        generated_flags(target)))
        return labels, matched_gt_boxes, groups

    def split_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                   regression_targets: list[Tensor], groups: list[Tensor]) -> dict[str, Tensor]:
        """The stock ``compute_loss`` per group (same sampler call, same normaliser)."""
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.cat(sampled_pos, dim=0).bool()
        sampled = pos | torch.cat(sampled_neg, dim=0).bool()
        num_sampled = int(sampled.sum())
        objectness = objectness.flatten()
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        groups_all = torch.cat(groups, dim=0)
        out: dict[str, Tensor] = {}
        # Losses of unsampled anchors are masked out with where(), never multiplied by 0, so an
        # extreme value on an unsampled anchor cannot leak a NaN into the sum.
        bce = F.binary_cross_entropy_with_logits(objectness, labels_all.clamp(min=0),
                                                 reduction="none")
        bce = torch.where(sampled, bce, torch.zeros_like(bce))
        add_per_group(bce, groups_all, max(num_sampled, 1), "loss_objectness", out)
        smooth_l1 = F.smooth_l1_loss(pred_bbox_deltas, targets_all, beta=1 / 9,
                                     reduction="none").sum(dim=1)
        smooth_l1 = torch.where(pos, smooth_l1, torch.zeros_like(smooth_l1))
        add_per_group(smooth_l1, groups_all, max(num_sampled, 1), "loss_rpn_box_reg", out)
        return out

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: Optional[list[dict[str, Tensor]]] = None):
        if not self.training:
            return super().forward(images, features, targets)
        if targets is None:
            raise ValueError("targets are required in training mode")
        feature_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_list)
        anchors = self.anchor_generator(images, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2]
                                 for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors)
        proposals = proposals.view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes,
                                         num_anchors_per_level)
        labels, matched_gt_boxes, groups = self.assign_with_groups(anchors, targets)
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        losses = self.split_loss(objectness, pred_bbox_deltas, labels, regression_targets, groups)
        return boxes, losses


"""The torchvision Mask R-CNN backend (default).

A stock torchvision ``MaskRCNN`` whose ``rpn`` and ``roi_heads`` are replaced by the split
subclasses of :mod:`trainer.backends.torchvision_heads` (same parameters, same state-dict keys as
the stock model, so torchvision checkpoints load). Example::

    backend = TorchvisionMaskRCNN.build(num_classes=12, arch="small", image_size=128)
    split = backend.losses(images, targets)           # SplitLosses
    split.total().backward()                          # == the stock Mask R-CNN loss
    detections = backend.predict(images)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN

from trainer.backends.base import ModuleBackend
from trainer.backends.split_losses import SplitLosses
from trainer.backends.torchvision_arch import build_maskrcnn
from trainer.backends.torchvision_heads import SplitRegionProposalNetwork, SplitRoIHeads


def make_split(model: MaskRCNN) -> MaskRCNN:
    """Swap ``model``'s RPN and RoI heads for their split subclasses (in place; returned)."""
    if not isinstance(model.roi_heads, SplitRoIHeads):
        model.roi_heads = SplitRoIHeads.from_stock(model.roi_heads)
    if not isinstance(model.rpn, SplitRegionProposalNetwork):
        model.rpn = SplitRegionProposalNetwork.from_stock(model.rpn)
    return model


class TorchvisionMaskRCNN(ModuleBackend):
    """`DetectorBackend` over a torchvision Mask R-CNN (see :mod:`trainer.backends.base`)."""

    name = "torchvision"
    classification_term = "loss_classifier"

    module: MaskRCNN

    def __init__(self, model: MaskRCNN, num_classes: int, arch: str = "custom",
                 device: torch.device | str = "cpu", amp: bool = False) -> None:
        super().__init__(make_split(model).to(torch.device(device)), num_classes, arch, device,
                         amp)

    @classmethod
    def build(cls, num_classes: int, arch: str = "small", image_size: int = 128,
              device: torch.device | str = "cpu", amp: bool = False) -> TorchvisionMaskRCNN:
        """A randomly initialised model of ``arch`` (see :mod:`trainer.backends.torchvision_arch`).

        ``amp``: run training forwards under bfloat16 autocast (no loss scaling needed).
        """
        return cls(build_maskrcnn(num_classes, arch, image_size), num_classes, arch, device, amp)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]], *,
               score_only: bool = False) -> SplitLosses:
        model = self._loss_model(score_only)
        with self._autocast():
            return SplitLosses.from_flat(model(images, targets))

    def real_classification_loss(self, images: list[Tensor],
                                 targets: list[dict[str, Tensor]]) -> Tensor:
        """Box-classifier cross-entropy on the ground-truth boxes (the reference's real loss).

        Runs transform → backbone/FPN → box RoI pool → box head → box predictor on the
        (resized) ground-truth boxes; RPN and mask head are not run and get no gradient.
        """
        return self._gt_box_loss(images, targets, "mean")

    def gt_box_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """N per-box cross-entropies of the box classifier on the ground-truth boxes (the
        targets' boxes concatenated in order; attached), through the same graph as
        `real_classification_loss`."""
        return self._gt_box_loss(images, targets, "none")

    @torch.no_grad()
    def gt_box_head_inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                           ) -> Tensor:
        """N x C x 7 x 7: the box head's RoI-pooled input at each ground-truth box (targets'
        boxes concatenated in order), computed without gradient (the backbone is not scored)."""
        model = self.module
        with self._autocast():
            batch, resized = model.transform(images, targets)
            features = model.backbone(batch.tensors)
            boxes = [t["boxes"].to(next(iter(features.values())).dtype) for t in resized]
            pooled = model.roi_heads.box_roi_pool(features, boxes, batch.image_sizes)
        return pooled.float()

    def head_losses(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """N cross-entropies of box head + class predictor on `gt_box_head_inputs`' output for
        training ``labels`` (N, 1..K); attached to the box head's and predictor's parameters."""
        heads = self.module.roi_heads
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")

    def _gt_box_loss(self, images: list[Tensor], targets: list[dict[str, Tensor]],
                     reduction: str) -> Tensor:
        model = self.module
        with self._autocast():
            batch, resized = model.transform(images, targets)
            features = model.backbone(batch.tensors)
            loss = model.roi_heads.gt_box_classification_loss(features, batch.image_sizes,
                                                              resized, reduction)
        return loss.float()

    @torch.no_grad()
    def gt_mask_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """N per-box binary cross-entropies (mean over the M x M mask grid) of the mask head's
        prediction for each ground-truth box's own class against its own mask, projected on the
        box as in training (targets' boxes concatenated in order; no gradient): how far a mask
        is from the shape the detector expects of its class in that box."""
        from torchvision.models.detection.roi_heads import project_masks_on_boxes

        model = self.module
        heads = model.roi_heads
        with self._autocast():
            batch, resized = model.transform(images, targets)
            features = model.backbone(batch.tensors)
            dtype = next(iter(features.values())).dtype
            boxes = [t["boxes"].to(dtype) for t in resized]
            logits = heads.mask_predictor(heads.mask_head(
                heads.mask_roi_pool(features, boxes, batch.image_sizes)))
        size = logits.shape[-1]
        labels = torch.cat([t["labels"] for t in resized]).to(logits.device)
        projected = torch.cat([
            project_masks_on_boxes(t["masks"], b.float(), torch.arange(len(b), device=b.device),
                                   size) for t, b in zip(resized, boxes)])
        chosen = logits[torch.arange(len(labels), device=logits.device), labels].float()
        return torch.nn.functional.binary_cross_entropy_with_logits(
            chosen, projected.float(), reduction="none").mean(dim=(1, 2))

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in the input images' frame; masks thresholded at 0.5 (bool)."""
        with self._eval_mode():
            outputs = self.module(images)
        return [
            {
                "boxes": o["boxes"].float(),
                "scores": o["scores"].float(),
                "labels": o["labels"].to(torch.int64),
                "masks": (o["masks"][:, 0] >= 0.5) if "masks" in o
                else torch.zeros((0,) + tuple(img.shape[-2:]), dtype=torch.bool),
            }
            for o, img in zip(outputs, images)
        ]

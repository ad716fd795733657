"""Detector backends behind one contract (`DetectorBackend`): torchvision Mask R-CNN (default)
and detectron2 Mask R-CNN (when ``import detectron2`` works)."""

from __future__ import annotations

import torch

from trainer.backends.base import DetectorBackend, image_tensor, target_tensors
from trainer.backends.split_losses import (
    CLEAR_GROUPS,
    GENERATED,
    GENERATED_BACKGROUND,
    GROUPS,
    REAL_BACKGROUND,
    REAL_FOREGROUND,
    REAL_GROUPS,
    SplitLosses,
)

BACKENDS = ("torchvision", "detectron2")


def build_backend(name: str, num_classes: int, arch: str = "small", image_size: int = 128,
                  device: torch.device | str = "cpu", amp: bool = False) -> DetectorBackend:
    """A randomly initialised detector of backend ``name`` (one of :data:`BACKENDS`).

    ``amp``: bfloat16 autocast in training forwards.
    """
    if name == "torchvision":
        from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN

        return TorchvisionMaskRCNN.build(num_classes, arch, image_size, device, amp)
    if name == "detectron2":
        from trainer.backends.detectron2_maskrcnn import Detectron2MaskRCNN

        return Detectron2MaskRCNN.build(num_classes, arch, image_size, device, amp)
    raise ValueError(f"detector backend {name!r} is unknown; use one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "CLEAR_GROUPS",
    "GENERATED",
    "GENERATED_BACKGROUND",
    "GROUPS",
    "REAL_BACKGROUND",
    "REAL_FOREGROUND",
    "REAL_GROUPS",
    "DetectorBackend",
    "SplitLosses",
    "build_backend",
    "image_tensor",
    "target_tensors",
]

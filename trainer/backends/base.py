"""The detector backend contract (docs/contracts.md, Detector backend) shared by the torchvision
and detectron2 backends.

Inputs, the same for every backend:

- ``images``: list of B float tensors 3 x H_i x W_i, RGB in [0, 1], on ``backend.device``;
- ``targets``: list of B dicts with ``boxes`` N x 4 float32 XYXY pixels, ``labels`` N int64
  (contiguous 1..K, 0 is background), ``masks`` N x H_i x W_i uint8/bool and ``generated``
  N bool (True for an instance pasted from a generated candidate; optional, default all False).

``losses`` returns a `SplitLosses` whose ``real + generated`` is the backend's stock loss;
``real_classification_loss`` is the reference's real "test" loss (classification on the
ground-truth boxes as RoIs, no proposals, no background); ``predict`` returns per image
``boxes`` N x 4 float32 XYXY, ``scores`` N float32, ``labels`` N int64, ``masks`` N x H x W bool.

``module`` is the bare ``nn.Module`` (parameters, state dict); ``model`` is what training
forwards go through: ``module`` itself, or a wrapper set with ``wrap`` (e.g. DDP from
``ray.train.torch.prepare_model``). Scoring forwards (``score_only=True``) go through ``module``
so that taking their gradients with ``torch.autograd.grad`` never leaves a DDP reducer waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from trainer.backends.split_losses import SplitLosses


@runtime_checkable
class DetectorBackend(Protocol):
    """What the train step needs from a detector (see the module docstring for layouts)."""

    name: str
    # The RoI classification term of `losses` (BSGAL scores with it).
    classification_term: str
    num_classes: int
    module: nn.Module
    model: nn.Module
    device: torch.device

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Route training forwards through ``wrapper(module)`` (e.g. DDP)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients, in a fixed order."""

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The box classifier's parameters (box head + predictor), a subset of the above."""

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]], *,
               score_only: bool = False) -> SplitLosses:
        """Training losses split into real and generated parts (module must be in train mode)."""

    def real_classification_loss(self, images: list[Tensor],
                                 targets: list[dict[str, Tensor]]) -> Tensor:
        """Classification loss on the ground-truth boxes as RoIs (0-dim, attached)."""

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image (eval mode is set and restored by the caller or here)."""


class ModuleBackend:
    """What both Mask R-CNN backends share: a ``module`` with ``roi_heads.box_head`` and
    ``roi_heads.box_predictor``, a ``model`` that training forwards go through, ``device``
    and ``amp`` (bfloat16 autocast of training forwards, no loss scaling needed)."""

    module: nn.Module
    model: nn.Module
    device: torch.device
    amp: bool

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        self.model = wrapper(self.module)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Box head and box predictor parameters (what efficient-mode BSGAL scores over)."""
        heads = self.module.roi_heads
        return [p for m in (heads.box_head, heads.box_predictor) for p in m.parameters()
                if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def image_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """H x W x 3 uint8 RGB → 3 x H x W float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8 RGB, got shape {image.shape} "
                         f"dtype {image.dtype}")
    return torch.tensor(image, device=device).permute(2, 0, 1).float() / 255


def target_tensors(boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                   generated: np.ndarray | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Numpy instances (N x 4 XYXY, N labels, N x H x W masks, N flags) → a target dict."""
    n = len(labels)
    if generated is None:
        generated = np.zeros(n, dtype=bool)
    if boxes.shape != (n, 4) or masks.shape[0] != n or generated.shape != (n,):
        raise ValueError(f"instance arrays disagree: boxes {boxes.shape}, labels {labels.shape}, "
                         f"masks {masks.shape}, generated {generated.shape}")
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(n, 4),
        "labels": torch.tensor(labels, dtype=torch.int64, device=device),
        "masks": torch.tensor(masks, dtype=torch.uint8, device=device),
        "generated": torch.tensor(generated, dtype=torch.bool, device=device),
    }

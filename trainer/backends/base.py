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

What the Mask R-CNN backends share is here too: `ModuleBackend` (the module/model pair, the
parameter lists, bfloat16 autocast, train-mode checks and eval-mode prediction) and the group
labelling of their split heads (`generated_flags`, `sample_groups`, `group_codes`,
`add_per_group`; the groups are those of :mod:`trainer.backends.split_losses`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from trainer.backends.split_losses import GROUP_CODE, GROUPS, SplitLosses

_FG_REAL = GROUP_CODE["real_foreground"]
_BG_REAL = GROUP_CODE["real_background"]
_FG_GEN = GROUP_CODE["generated"]
_BG_GEN = GROUP_CODE["generated_background"]


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

    def gt_box_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """The same loss per ground-truth box: N (targets' boxes concatenated in order)."""

    def gt_box_head_inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                           ) -> Tensor:
        """The box head's pooled input at each ground-truth box (N x ...), without gradient."""

    def head_losses(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """N box-classifier cross-entropies from `gt_box_head_inputs`' output (attached to
        `classifier_parameters` only)."""

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image (eval mode is set and restored by the caller or here)."""


class ModuleBackend:
    """What both Mask R-CNN backends share: a ``module`` with ``roi_heads.box_head`` and
    ``roi_heads.box_predictor``, a ``model`` that training forwards go through, ``device``
    and ``amp`` (bfloat16 autocast of training forwards, no loss scaling needed)."""

    module: nn.Module
    model: nn.Module
    device: torch.device
    num_classes: int
    arch: str
    amp: bool

    def __init__(self, module: nn.Module, num_classes: int, arch: str,
                 device: torch.device | str, amp: bool) -> None:
        self.device = torch.device(device)
        self.module = module
        self.model = module
        self.num_classes = num_classes
        self.arch = arch
        self.amp = amp

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        self.model = wrapper(self.module)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Box head and box predictor parameters (what instance-level BSGAL scores over by
        default, ``selection.score_parameters: heads``)."""
        heads = self.module.roi_heads
        return [p for m in (heads.box_head, heads.box_predictor) for p in m.parameters()
                if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _loss_model(self, score_only: bool) -> nn.Module:
        """What a `losses` forward goes through: ``module`` for scoring, else ``model``; the
        module must be in train mode."""
        if not self.module.training:
            raise RuntimeError("losses() needs the model in train mode (call module.train())")
        return self.module if score_only else self.model

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """``module`` in eval mode inside the block, its train/eval mode restored after."""
        was_training = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(was_training)


def generated_flags(target: dict[str, Tensor]) -> Tensor:
    """The target's ``generated`` flags as bool [N] (all False when absent)."""
    n = target["boxes"].shape[0]
    flags = target.get("generated")
    if flags is None:
        return torch.zeros(n, dtype=torch.bool, device=target["boxes"].device)
    if flags.shape != (n,):
        raise ValueError(f"target 'generated' has shape {tuple(flags.shape)}; expected ({n},), "
                         "one flag per box")
    return flags.to(dtype=torch.bool)


def real_background_groups(n: int, device: torch.device | str) -> Tensor:
    """Group codes of ``n`` samples of an image without ground truth: all real background."""
    return torch.full((n,), _BG_REAL, dtype=torch.int64, device=device)


def group_codes(match_quality: Tensor, positive: Tensor, matched_generated: Tensor,
                generated: Tensor) -> Tensor:
    """Group code (index into GROUPS) of each anchor/RoI of an image with ground truth.

    Args:
        match_quality: G x S IoU between ground truth boxes and samples (G > 0).
        positive: S bool, the sample is a foreground sample.
        matched_generated: S bool, the sample's matched ground truth is a generated instance
            (read for positives only).
        generated: G bool, the ground truth is a generated instance.

    Returns:
        S int64: positives take the group of their matched ground truth; negatives are
        ``generated_background`` when their best-IoU ground truth is generated with IoU > 0.
    """
    best_iou, best_gt = match_quality.max(dim=0)
    on_generated = generated[best_gt] & (best_iou > 0)
    fg = torch.where(matched_generated, _FG_GEN, _FG_REAL)
    bg = torch.where(on_generated, _BG_GEN, _BG_REAL)
    return torch.where(positive, fg, bg).to(torch.int64)


def sample_groups(match_quality: Tensor, matched_idxs: Tensor, positive: Tensor,
                  generated: Tensor) -> Tensor:
    """`group_codes` with the matched ground truth given by index (``matched_idxs``: S int64,
    clamped to >= 0); all real background when the image has no ground truth (G = 0)."""
    if match_quality.shape[0] == 0:
        return real_background_groups(match_quality.shape[1], match_quality.device)
    return group_codes(match_quality, positive, generated[matched_idxs], generated)


def add_per_group(values: Tensor, groups: Tensor, denominator: float | Tensor, term: str,
                  out: dict[str, Tensor], weight: float | None = None) -> None:
    """``out["<group>/<term>"]`` = sum of ``values`` over the group / ``denominator``, for every
    group; with a loss ``weight`` (detectron2's), sum x (weight / denominator) instead."""
    for name in GROUPS:
        in_group = groups == GROUP_CODE[name]
        total = torch.where(in_group, values, torch.zeros_like(values)).sum()
        out[f"{name}/{term}"] = (total / denominator if weight is None
                                 else total * (weight / denominator))


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

"""Per-instance losses and contribution estimates for the generated instances of a pasted batch.

The loss of generated instance k is the box classifier's cross-entropy on its own ground-truth
box as the RoI (``backend.gt_box_losses``): the same kind of loss as the real "test" loss, and
defined for every pasted instance that survived pasting (a loss over *sampled* RoIs gives no
score to the 4–7 % of pasted instances that get no sampled RoI). The RoIs are the ground-truth
boxes, so they do not move when the weights do: what the directional estimator needs.

The contribution of instance k is the first-order effect of a step on it on the real loss,
⟨g, ∇ℓ_k⟩ over all trainable parameters, where g is the real-data gradient of the gradient
cache (a cache per class in `selector.instance_selector.ClassGradientCaches`). Two estimators:

- `exact_dots`: one backward per instance, K backwards (the reference the others are checked
  against);
- `directional_dots`: all K dot products with one direction u from a central difference of the
  K losses along u, (ℓ(θ + εu) − ℓ(θ − εu)) / 2ε, two no-grad forwards whatever K is. The model
  stays in train mode (BatchNorm batch statistics, as in the exact gradient) and its buffers
  (running statistics) and weights are put back bit for bit afterwards.

Tensors: ``losses`` K float32; flat gradients (P,) over the parameters in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trainer.copy_paste import PastedImage


@dataclass(frozen=True)
class GeneratedInstances:
    """The generated instances of a pasted batch, in the order of the concatenated targets.

    Attributes:
        rows: K int64, each instance's index among the batch's N ground-truth boxes (all images'
            boxes concatenated in order), i.e. into ``backend.gt_box_losses``' output.
        positions: K int64, the candidate position (in its incoming batch) of each instance.
        labels: K int64, training labels (1..C).
    """

    rows: np.ndarray
    positions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def generated_instances(pasted: Sequence[PastedImage]) -> GeneratedInstances:
    """Locate the generated instances of ``pasted`` (those that survived occlusion)."""
    rows, positions, labels = [], [], []
    offset = 0
    for p in pasted:
        for i, source in enumerate(p.source_positions.tolist()):
            if source >= 0:
                rows.append(offset + i)
                positions.append(source)
                labels.append(int(p.labels[i]))
        offset += len(p.labels)
    return GeneratedInstances(np.array(rows, np.int64), np.array(positions, np.int64),
                              np.array(labels, np.int64))


def flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Per-parameter gradients (None = zero) as one float32 (P,) vector."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def exact_gradients(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """K x P: the gradient of each of the K (attached) losses, one backward each."""
    rows = []
    for k in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[k], list(params), retain_graph=True,
                                    allow_unused=True)
        rows.append(flat(grads, params))
    if not rows:
        return torch.zeros((0, sum(p.numel() for p in params)))
    return torch.stack(rows)


def exact_dots(losses: Tensor, params: Sequence[Tensor], directions: Tensor) -> tuple[Tensor,
                                                                                         Tensor]:
    """Exact ⟨directions[k], ∇ℓ_k⟩ and ‖∇ℓ_k‖ for each instance (``directions``: K x P, one
    direction per instance, e.g. the cache of its class). Returns (K dots, K norms)."""
    grads = exact_gradients(losses, params)
    return (grads * directions).sum(dim=1), torch.linalg.vector_norm(grads, dim=1)


@torch.no_grad()
def directional_dots(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], direction: Tensor,
                     *, eps: float = 1e-3, buffers: Sequence[Tensor] = ()) -> Tensor:
    """⟨direction, ∇ℓ_k⟩ for every k from a central difference along ``direction``.

    Args:
        loss_fn: returns the K losses at the current weights (called twice, without grad).
        params: the parameters ``direction`` (P,) is laid out over.
        direction: (P,), any norm; the step is ε along its unit vector, ‖θ‖-relative sizes of
            1e-4…1e-2 agree with the exact dots (tests/test_instance_scores.py).
        buffers: tensors the forwards may change (BatchNorm running statistics); restored.

    Returns:
        K float32 dots (zeros when the direction is zero).
    """
    norm = float(torch.linalg.vector_norm(direction))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the scoring direction has norm {norm}; the gradient cache "
                                 "is poisoned")
    if norm == 0:
        return torch.zeros_like(loss_fn().float())
    unit = direction / norm
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    pieces = []
    start = 0
    for p in params:
        pieces.append(unit[start:start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    try:
        for p, u in zip(params, pieces):
            p.add_(u, alpha=eps)
        plus = loss_fn().float()
        for p, saved, u in zip(params, saved_params, pieces):
            p.copy_(saved).add_(u, alpha=-eps)
        minus = loss_fn().float()
    finally:
        for p, saved in zip(params, saved_params):
            p.copy_(saved)
        for b, saved in zip(buffers, saved_buffers):
            b.copy_(saved)
    return (plus - minus) * (norm / (2 * eps))


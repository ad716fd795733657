"""The exact look-ahead contribution ("loss estimate" in the reference).

Computes the paper's contribution without the Taylor approximation:

    φ(g) = L_real(θ) − L_real(θ − α·∇ℓ_g(θ))

by taking one plain SGD step on the candidate loss, measuring the real-data loss, and putting the
weights back bit for bit. It costs a candidate forward+backward, two real forwards and a copy of
the parameters, so it serves as a baseline and as the ground truth the first-order score
α·⟨∇L_real, ∇ℓ_g⟩ (`selector.score`) is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from selector.flat_gradient import ParameterLayout, gradient_norm, parameter_gradients


@dataclass(frozen=True)
class LookaheadResult:
    """Outcome of one look-ahead.

    Attributes:
        gain: φ = real_loss_before − real_loss_after; > 0 means the candidate step lowers the
            real-data loss. NaN if any loss or the candidate gradient was not finite.
        real_loss_before: L_real(θ).
        real_loss_after: L_real(θ − lr·∇ℓ_g(θ)).
        candidate_grad_norm: ‖∇ℓ_g(θ)‖₂.
    """

    gain: float
    real_loss_before: float
    real_loss_after: float
    candidate_grad_norm: float


def exact_lookahead_gain(params: Iterable[Tensor], candidate_loss: Callable[[], Tensor],
                         real_loss: Callable[[], Tensor], *, lr: float,
                         buffers: Iterable[Tensor] = ()) -> LookaheadResult:
    """One SGD step of size ``lr`` on the candidate loss, the change of the real loss, then undo.

    Args:
        params: the trainable parameters the step moves.
        candidate_loss: closure returning the scalar loss of the generated part (runs a forward
            with grad enabled).
        real_loss: closure returning the scalar real-data loss (called twice under no_grad).
        lr: step size α (> 0).
        buffers: tensors the closures may change and that must come back too, e.g.
            ``model.buffers()`` for BatchNorm running statistics in train mode.

    Returns:
        `LookaheadResult`. Parameters and buffers are restored exactly (bitwise) even if a
        closure raises.
    """
    if not lr > 0:
        raise ValueError(f"look-ahead step size lr={lr} must be positive")
    layout = ParameterLayout(params)
    buffers = list(buffers)
    saved_params = [p.detach().clone() for p in layout.params]
    saved_buffers = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            before = float(real_loss())
        grads = parameter_gradients(candidate_loss(), layout.params)
        grad_norm = gradient_norm(grads)
        if not math.isfinite(grad_norm):
            return LookaheadResult(math.nan, before, math.nan, grad_norm)
        with torch.no_grad():
            for param, grad in zip(layout.params, grads):
                if grad is not None:
                    param.sub_(grad, alpha=lr)
            after = float(real_loss())
    finally:
        with torch.no_grad():
            for param, saved in zip(layout.params, saved_params):
                param.copy_(saved)
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
    gain = before - after
    return LookaheadResult(gain if math.isfinite(gain) else math.nan, before, after, grad_norm)

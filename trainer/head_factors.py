"""Per-box gradient factors of the box classifier: one backward gives every box's gradient.

For a box i scored by its own RoI, its loss ℓ_i (the box classifier's cross-entropy) depends on
the head's linear layers only through that box's row, so over each linear layer y = W x + b the
gradient of ℓ_i is rank one::

    ∇_W ℓ_i = δ_i x_iᵀ,   ∇_b ℓ_i = δ_i,   δ_i = ∂ℓ_i/∂y_i   (d_out),  x_i: the layer's input (d_in)

The rows of a batch are independent (ReLUs and the cross-entropy act row by row; the head has
no normalisation across rows), so one backward of Σ_i ℓ_i to the layers' outputs gives every
δ_i at once: no per-box backward and no per-box gradient of P numbers is ever materialised. A
class's mean real gradient is then (1/n) Σ_i δ_i x_iᵀ per layer, and the dot product of two
such gradients is Σ_l (δ_aᵀ δ_b)(x_aᵀ x_b) (+ the bias terms).

The factors are `selector.class_sketch.LayerFactors`. `head_factors` works for any head made
of ``nn.Linear`` layers and elementwise functions
(torchvision's TwoMLPHead + FastRCNNPredictor, detectron2's FC heads); a layer that gets no
gradient from the classification loss (the box-regression layer) is left out. Tensors: N boxes;
``x`` N x d_in, ``delta`` N x d_out, float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from selector.class_sketch import LayerFactors


def linear_layers(modules: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers of ``modules`` (``(prefix, module)`` pairs) in order; ValueError
    if any of them holds trainable parameters outside a linear layer (a conv head: no rank-one
    factors)."""
    found = []
    for prefix, module in modules:
        for name, sub in module.named_modules():
            own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            if isinstance(sub, nn.Linear):
                found.append((f"{prefix}.{name}" if name else prefix, sub))
            elif own:
                raise ValueError(f"{prefix}.{name} ({type(sub).__name__}) has parameters but is "
                                 "not a linear layer: its per-box gradients are not rank one; "
                                 "use selection.cache_sketch=none")
    return found


def head_factors(losses_fn, pooled: Tensor, labels: Tensor,
                 layers: Sequence[tuple[str, nn.Linear]]) -> tuple[Tensor, list[LayerFactors]]:
    """The per-box losses and every layer's per-box factors.

    Args:
        losses_fn: ``(pooled, labels) -> N losses`` through the head (`backend.head_losses`).
        pooled: N x ..., the head's RoI-pooled inputs (no gradient needed).
        labels: N training labels.
        layers: the head's linear layers (`linear_layers`).

    Returns:
        (N losses, detached; the factors of the layers that get a gradient). Nothing is
        accumulated into any parameter's ``.grad``.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers:
        def hook(module: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            inputs[name] = args[0]
            outputs[name] = out
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            losses = losses_fn(pooled, labels)
            names = [n for n, _ in layers if n in outputs]
            grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in names],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    by_name = dict(layers)
    factors = []
    for name, delta in zip(names, grads):
        if delta is None:  # no gradient from the classification loss (box regression)
            continue
        x = inputs[name].detach().reshape(delta.shape[0], -1).float()
        factors.append(LayerFactors(name, x, delta.detach().float(),
                                    by_name[name].bias is not None))
    return losses.detach(), factors

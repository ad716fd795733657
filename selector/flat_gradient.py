"""Gradients of a loss with respect to a fixed list of parameters, flat or per parameter.

BSGAL compares whole-model gradients: one vector over all trainable parameters, concatenated in
the order the parameters are given (for a module: ``list(model.parameters())`` filtered to
``requires_grad``). Two equivalent forms are accepted everywhere in `selector`:

- **flat**: a 1-D tensor of ``layout.numel`` elements (what `FlatGradient` produces). Costs one
  persistent buffer (4 bytes/parameter in fp32) but is one contiguous vector.
- **per parameter**: a sequence with one entry per parameter, each a tensor of that parameter's
  shape or ``None`` (what ``torch.autograd.grad(..., allow_unused=True)`` returns; see
  `parameter_gradients`). ``None`` means "received no gradient" and counts as zeros. This form
  needs no extra buffer at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Union

import torch
from torch import Tensor

# A whole-model gradient: flat (numel,) tensor, or one tensor-or-None per parameter.
GradientLike = Union[Tensor, Sequence[Union[Tensor, None]]]


class ParameterLayout:
    """Where each parameter's elements sit in the flat whole-model vector.

    Args:
        params: the trainable parameters, in a fixed order. Each must require grad and appear once.
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("no parameters given: pass the model's trainable parameters, "
                             "e.g. [p for p in model.parameters() if p.requires_grad]")
        seen: set[int] = set()
        for index, param in enumerate(self.params):
            if not isinstance(param, Tensor):
                raise TypeError(f"parameter {index} is a {type(param).__name__}, not a tensor")
            if not param.requires_grad:
                raise ValueError(f"parameter {index} (shape {tuple(param.shape)}) does not require "
                                 "grad; pass only trainable parameters")
            if id(param) in seen:
                raise ValueError(f"parameter {index} is listed twice; its gradient would count "
                                 "double (deduplicate, e.g. with list(model.parameters()))")
            seen.add(id(param))
        self.shapes: list[torch.Size] = [p.shape for p in self.params]
        self.numels: list[int] = [p.numel() for p in self.params]
        self.offsets: list[int] = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.numel: int = self.offsets[-1]

    def __len__(self) -> int:
        return len(self.params)

    def shaped_views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat (numel,) tensor, one per parameter, each in that parameter's shape."""
        self.check_flat(flat)
        return [flat[a:b].view(shape)
                for a, b, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def check_flat(self, flat: Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat gradient has shape {tuple(flat.shape)}; expected ({self.numel},)"
                             " for these parameters")

    def check(self, grad: GradientLike) -> None:
        """Raise ValueError unless ``grad`` is a flat or per-parameter gradient for this layout."""
        if isinstance(grad, Tensor):
            self.check_flat(grad)
            return
        if len(grad) != len(self.params):
            raise ValueError(f"per-parameter gradient has {len(grad)} entries; expected "
                             f"{len(self.params)} (one per parameter, None for unused)")
        for index, (g, shape) in enumerate(zip(grad, self.shapes)):
            if g is not None and g.shape != shape:
                raise ValueError(f"gradient {index} has shape {tuple(g.shape)}; its parameter has "
                                 f"shape {tuple(shape)}")

    def pieces(self, grad: GradientLike) -> list[tuple[int, int, Tensor | None]]:
        """``(start, stop, piece)`` for each part of ``grad``: 1-D pieces aligned with
        ``flat[start:stop]``; ``None`` pieces are zeros. A flat gradient is one piece."""
        self.check(grad)
        if isinstance(grad, Tensor):
            return [(0, self.numel, grad)]
        return [(a, b, None if g is None else g.reshape(-1))
                for a, b, g in zip(self.offsets[:-1], self.offsets[1:], grad)]


def gradient_norm(grad: GradientLike) -> float:
    """L2 norm of a flat or per-parameter gradient, as a Python float.

    NaN or ±Inf anywhere gives a non-finite result, and so does a gradient so large that its
    squared norm overflows float32 (elements beyond ~1e19); callers use this as the finiteness
    check, which costs no pass over the data beyond the norm itself.
    """
    if isinstance(grad, Tensor):
        return float(torch.linalg.vector_norm(grad))
    total = 0.0
    for g in grad:
        if g is not None:
            total += float(torch.linalg.vector_norm(g)) ** 2
    return math.sqrt(total)


def parameter_gradients(loss: Tensor, params: Sequence[Tensor], *,
                        retain_graph: bool = False) -> list[Tensor | None]:
    """Gradient of a scalar ``loss`` w.r.t. ``params``: one tensor (or None if unused) per
    parameter, without touching ``param.grad`` (so DDP's reducer hooks do not fire).

    A loss that does not depend on any trainable parameter (e.g. a constant zero because no
    generated instance was matched) gives all-None, i.e. a zero gradient.
    """
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar tensor; got shape {tuple(loss.shape)} "
                         "(sum or mean it first)")
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, list(params), retain_graph=retain_graph,
                                    allow_unused=True))


class FlatGradient:
    """A reusable flat buffer holding the gradient of a loss w.r.t. fixed parameters.

    ``compute`` overwrites and returns the same (numel,) tensor on every call: consume it (update
    the cache, score it) before the next call. One instance serves two losses from two graphs
    (the faithful step: real loss, then generated loss) or from one graph
    (``compute(first, retain_graph=True)``, then ``compute(second)``).

    Args:
        params: trainable parameters, in the same order as the `GradientCache`'s.
        dtype: buffer dtype (float32 by default).
        device: buffer device (default: the first parameter's).
    """

    def __init__(self, params: Iterable[Tensor], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.layout = ParameterLayout(params)
        device = self.layout.params[0].device if device is None else torch.device(device)
        self.buffer: Tensor = torch.zeros(self.layout.numel, dtype=dtype, device=device)
        self._views = self.layout.shaped_views(self.buffer)

    @property
    def numel(self) -> int:
        return self.layout.numel

    def compute(self, loss: Tensor, *, retain_graph: bool = False) -> Tensor:
        """Return d(loss)/d(params) in the reusable (numel,) buffer; unused parameters give 0."""
        grads = parameter_gradients(loss, self.layout.params, retain_graph=retain_graph)
        return self.copy_from(grads)

    @torch.no_grad()
    def copy_from(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Copy a per-parameter gradient into the buffer (None → zeros) and return the buffer."""
        self.layout.check(grads)
        for view, g in zip(self._views, grads):
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
        return self.buffer

"""The gradient cache: a running estimate of the real-data gradient (BSGAL §3, "gradient cache").

Instead of a fresh validation gradient at every step, BSGAL keeps one flat vector ``c`` over all
trainable parameters and folds each real-data ("test" batch) gradient ``g`` into it:

- ``momentum`` (reference default, m = 0.1):  c ← m·c + (1 − m)·g   (m = weight kept on the old c)
- ``average``  (running mean over updates):   c ← c + (g − c)/n      (n = number of updates so far)

The cache starts at zero, as in the reference, so after the first momentum update c = (1 − m)·g
(the direction, which is all the cosine score sees, is g's). Feed gradients of unscaled losses:
with AMP loss scaling, unscale first, or steps with different scales would be mixed unevenly.

Cross-worker behaviour (``sync``):

- ``"per_worker"`` (reference behaviour, the default): every worker keeps its own cache of its own
  real batches; caches differ across ranks. Checkpoint each rank's cache if you need them back.
- ``"all_reduce"``: before the update, the real gradient is averaged across ranks with
  ``torch.distributed.all_reduce`` (in place: the caller's gradient tensor now holds the mean).
  All ranks then apply the same update to the same cache, so caches stay identical; a non-finite
  gradient on any rank makes the mean non-finite everywhere, so all ranks skip the same update.
  Every rank must call `update` the same number of times. Without an initialised process group
  (or with one process) it behaves like ``per_worker``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from selector.decision import INVALID_NAN_REAL_GRAD
from selector.flat_gradient import GradientLike, ParameterLayout, gradient_norm

UPDATE_MODES = ("momentum", "average")
SYNC_MODES = ("per_worker", "all_reduce")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Upper bound on the elements converted at once when the cache and gradient dtypes/devices
# differ (bf16 storage, cache on another device): temporaries stay under 1 MiB however large a
# parameter is, and slices are still long enough for the per-call overhead not to show.
_CONVERT_SLICE = 1 << 17


class GradientCache:
    """Running estimate of the whole-model real-data gradient, in one preallocated flat buffer.

    Args:
        params: the trainable parameters, in the order gradients are given (see `ParameterLayout`).
        mode: ``"momentum"`` or ``"average"`` (see the module docstring).
        momentum: m, the weight kept on the old cache in momentum mode, in [0, 1). Reference: 0.1.
        dtype: storage dtype of the buffer: torch.float32 (default, 4 bytes/parameter) or
            torch.bfloat16 (2 bytes/parameter; updates are computed in float32, then rounded).
        device: where the buffer lives (default: the first parameter's device).
        sync: ``"per_worker"`` or ``"all_reduce"``.
        process_group: group for ``all_reduce`` (default: the world).

    Attributes:
        buffer: the cache, a (numel,) tensor of ``dtype``; zero until the first update.
        num_updates: how many real gradients have been folded in.
    """

    def __init__(self, params: Iterable[Tensor], *, mode: str = "momentum", momentum: float = 0.1,
                 dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None,
                 sync: str = "per_worker", process_group: Any = None) -> None:
        if mode not in UPDATE_MODES:
            raise ValueError(f"cache update mode {mode!r} is unknown; use one of {UPDATE_MODES}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1): it is the weight kept on the "
                             "old cache (reference 0.1)")
        if sync not in SYNC_MODES:
            raise ValueError(f"cache sync {sync!r} is unknown; use one of {SYNC_MODES}")
        if isinstance(dtype, str):
            if dtype not in STORAGE_DTYPES:
                raise ValueError(f"cache dtype {dtype!r} is unknown; use one of "
                                 f"{tuple(STORAGE_DTYPES)}")
            dtype = STORAGE_DTYPES[dtype]
        if dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"cache dtype {dtype} is not supported; use torch.float32 or "
                             "torch.bfloat16")
        self.layout = ParameterLayout(params)
        self.mode = mode
        self.momentum = float(momentum)
        self.sync = sync
        self.process_group = process_group
        device = self.layout.params[0].device if device is None else torch.device(device)
        self.buffer: Tensor = torch.zeros(self.layout.numel, dtype=dtype, device=device)
        self.num_updates = 0
        self._norm: float | None = 0.0

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    def nbytes(self) -> int:
        """Bytes held by the cache buffer."""
        return self.buffer.numel() * self.buffer.element_size()

    # -- update ----------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, real_grad: GradientLike) -> str | None:
        """Fold one real-data gradient into the cache.

        Args:
            real_grad: flat (numel,) tensor or one tensor-or-None per parameter (None = zeros).
                In ``all_reduce`` mode it is averaged across ranks in place first.

        Returns:
            None if the cache was updated, otherwise ``"invalid_nan_real_grad"``: the gradient was
            not finite and the cache (and ``num_updates``) were left untouched.
        """
        self.layout.check(real_grad)
        real_grad = self._all_reduce_mean(real_grad)
        if not math.isfinite(gradient_norm(real_grad)):
            return INVALID_NAN_REAL_GRAD
        if self.mode == "momentum":
            weight = 1.0 - self.momentum          # c ← c + (1−m)(g − c) = m·c + (1−m)·g
        else:
            weight = 1.0 / (self.num_updates + 1)  # c ← c + (g − c)/n
        for cache_part, grad_part in self._aligned(real_grad):
            if grad_part is None:                  # no gradient = zero gradient
                cache_part.mul_(1.0 - weight)
            elif grad_part.dtype == cache_part.dtype:
                cache_part.lerp_(grad_part, weight)
            else:                                  # e.g. bf16 storage: compute in fp32, round once
                work = cache_part.to(_compute_dtype(cache_part, grad_part))
                work.lerp_(grad_part.to(work.dtype), weight)
                cache_part.copy_(work)
        self.num_updates += 1
        self._norm = None
        return None

    def _all_reduce_mean(self, grad: GradientLike) -> GradientLike:
        if self.sync != "all_reduce" or not (dist.is_available() and dist.is_initialized()):
            return grad
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return grad
        if isinstance(grad, Tensor):
            parts = [grad]
        else:
            # Every rank must reduce every parameter in the same order, even those that got no
            # gradient here (another rank may have one).
            parts = [torch.zeros_like(p) if g is None else g
                     for p, g in zip(self.layout.params, grad)]
        for part in parts:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self.process_group)
            part.div_(world)
        return grad if isinstance(grad, Tensor) else parts

    # -- reading ---------------------------------------------------------------------------

    @torch.no_grad()
    def norm(self) -> float:
        """L2 norm of the cache (float; recomputed only after an update or load)."""
        if self._norm is None:
            if self.buffer.dtype == torch.float32:
                self._norm = float(torch.linalg.vector_norm(self.buffer))
            else:
                squares = 0.0
                for start in range(0, self.buffer.numel(), _CONVERT_SLICE):
                    part = self.buffer[start:start + _CONVERT_SLICE].float()
                    squares += float(torch.linalg.vector_norm(part)) ** 2
                self._norm = math.sqrt(squares)
        return self._norm

    @torch.no_grad()
    def dot(self, grad: GradientLike) -> float:
        """⟨cache, grad⟩ as a Python float (None entries of a per-parameter gradient are zeros)."""
        total = 0.0
        for cache_part, grad_part in self._aligned(grad):
            if grad_part is None:
                continue
            if grad_part.dtype == cache_part.dtype:
                total += float(torch.dot(cache_part, grad_part))
            else:
                dtype = _compute_dtype(cache_part, grad_part)
                total += float(torch.dot(cache_part.to(dtype), grad_part.to(dtype)))
        return total

    def _aligned(self, grad: GradientLike) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Pairs (view of the cache buffer, matching 1-D piece of ``grad`` or None)."""
        for start, stop, piece in self.layout.pieces(grad):
            cache_part = self.buffer[start:stop]
            if piece is None or (piece.dtype == cache_part.dtype
                                 and piece.device == cache_part.device):
                yield cache_part, piece
                continue
            for s in range(0, stop - start, _CONVERT_SLICE):
                yield (cache_part[s:s + _CONVERT_SLICE],
                       piece[s:s + _CONVERT_SLICE].to(cache_part.device))

    # -- checkpoint ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats and strings only: loads with ``torch.load(weights_only=True)``."""
        return {
            "mode": self.mode,
            "momentum": self.momentum,
            "num_updates": self.num_updates,
            "numel": self.numel,
            "shapes": [list(s) for s in self.layout.shapes],
            "buffer": self.buffer.detach().clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cache saved by `state_dict` (stored in this cache's dtype and device)."""
        if state["numel"] != self.numel or state["shapes"] != [list(s) for s in self.layout.shapes]:
            raise ValueError(f"checkpointed gradient cache covers {state['numel']} elements in "
                             f"{len(state['shapes'])} parameters; this model has {self.numel} in "
                             f"{len(self.layout)}: the parameter list or model changed")
        if state["mode"] != self.mode or float(state["momentum"]) != self.momentum:
            raise ValueError(f"checkpointed cache used mode={state['mode']!r}, momentum="
                             f"{state['momentum']}; this run has mode={self.mode!r}, momentum="
                             f"{self.momentum}. Use the checkpoint's settings or start a new cache")
        self.buffer.copy_(state["buffer"])
        self.num_updates = int(state["num_updates"])
        self._norm = None


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)

"""Optimizer, learning-rate schedule and weight EMA of the training loop.

Reference set-up (docs/algorithm.md, Reference training set-up): AdamW lr 1e-4, linear warmup
then cosine decay, EMA 0.999.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def build_optimizer(params: list[nn.Parameter], name: str = "adamw", lr: float = 1e-4,
                    weight_decay: float = 1e-4, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (reference) or SGD with momentum over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is unknown; use one of {OPTIMIZERS}")


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup_steps`` (from 1/warmup), then cosine to
    ``final_fraction`` at ``total_steps`` (``schedule="constant"``: 1 after warmup).

    A plain callable object for ``LambdaLR``: its attributes are what the scheduler's
    ``state_dict`` stores, so checkpoints stay plain data.
    """

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                 final_fraction: float = 0.0) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is unknown; use one of {SCHEDULES}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.schedule = schedule
        self.final_fraction = float(final_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (
            1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, total_steps, schedule))


class ModelEma:
    """Exponential moving average of a module's floating-point parameters and buffers.

    ``shadow = decay * shadow + (1 - decay) * current`` after every optimizer step; integer
    buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for key, value in module.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - self.decay)
            else:
                shadow.copy_(value)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Run the block with the EMA weights loaded into ``module``; restore after."""
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield
        finally:
            module.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)

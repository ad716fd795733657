"""One training step with BSGAL selection: the gradients to apply and the decision on the batch.

`BsgalStep` leaves the gradients of the step in ``param.grad`` (the training loop clips them and
steps the optimizer) and returns a `StepOutcome`: the decision on the pasted batch and the loss
that was trained on.

Faithful mode (default; docs/algorithm.md, Faithful mode: the reference's three forward+backward
passes):

1. real "test" batch (real images containing the pasted classes): box-classifier cross-entropy
   on the ground-truth boxes as RoIs (no proposals, no background; `real_classification_loss`)
   → gradient over all trainable parameters → gradient cache update;
2. pasted batch: the generated part of the RoI classification loss (cross-entropy of sampled
   RoIs matched to pasted instances, divided by the number of sampled RoIs) → gradient → score
   against the cache → decision by the threshold policy;
3. train (full Mask R-CNN loss) on the pasted batch if accepted, else on the same real images
   without the pastes (the originals, pixel for pixel).

Scoring forwards run in train mode like the training one, so BatchNorm running statistics also
see the real "test" and pasted batches (the reference's frozen BatchNorm has none to update).

A batch whose pasted instances were all lost (occluded away, or too small after resizing) is
``invalid_empty_batch`` and trains on the originals, without the scoring passes.

The torchvision backend's classifier is a softmax cross-entropy (the reference's CenterNet2 uses
sigmoid BCE over its cascade stages); each backend uses its own classification loss.

Gradients are taken over all trainable parameters (the reference). The batch-level efficient
mode (one forward, head-only gradients from the pasted batch's real part) was removed: its score
ranked batches no better than chance against the exact look-ahead (Spearman −0.11,
benchmarks/results/selection_quality_batch.md); instance granularity
(`trainer.instance_step`) is the cheap mode that selects.

The scoring gradients are taken with ``torch.autograd.grad``, which never fires the gradient
hooks of a DDP wrapper; scoring forwards go through the bare module, the training forward
through the wrapper so that its backward is synchronised as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selector import BatchSelector, parameter_gradients
from trainer.backends.base import DetectorBackend
from trainer.candidates import INVALID_NAN_LOSS, nan_if_none
from trainer.copy_paste import PastedImage
from trainer.real_data import original_inputs, pasted_inputs, real_inputs

MODES = ("faithful",)
#: Why a mode that existed is gone (shown when someone asks for it).
REMOVED_MODES = {"efficient": "the batch-level efficient mode was removed: its head-only score "
                              "ranked batches no better than chance (Spearman -0.11 with the "
                              "exact look-ahead); use selection.granularity=instance, whose "
                              "per-candidate scoring costs ~1.3x a plain step"}

TRAINED_ON_PASTED = "pasted"
TRAINED_ON_ORIGINAL = "original"


class NonFiniteLossError(FloatingPointError):
    """A training loss term is NaN or infinite; the message names the step and the term."""

    def __init__(self, step: int, term: str, value: float, batch: str) -> None:
        self.step, self.term, self.value = step, term, value
        super().__init__(
            f"step {step}: training loss term '{term}' is {value} on the {batch} batch; the "
            "model or the data diverged (lower training.lr, raise warmup, check the images), "
            "training stops here instead of applying a poisoned update")


@dataclass
class StepOutcome:
    """What one step decided and trained on.

    Attributes:
        accepted / reason / score / threshold / cache_norm / policy: the decision on the pasted
            batch (``reason`` from `selector.REASONS` or ``invalid_nan_loss``; NaN numbers
            where nothing was scored).
        trained_on: ``"pasted"`` or ``"original"``.
        losses: the trained loss terms (floats), ``"<term>"`` summed over the groups used.
        num_generated: generated instances present in the pasted batch's targets.
    """

    accepted: bool
    reason: str
    trained_on: str
    score: float = math.nan
    threshold: float = math.nan
    cache_norm: float = math.nan
    policy: str = ""
    losses: dict[str, float] = field(default_factory=dict)
    num_generated: int = 0


def check_finite(losses: Mapping[str, Tensor], step: int, batch: str) -> None:
    """Raise `NonFiniteLossError` for the first non-finite term."""
    for term, value in losses.items():
        v = float(value.detach())
        if not math.isfinite(v):
            raise NonFiniteLossError(step, term, v, batch)


class BsgalStep:
    """Computes one step's gradients and decision (module docstring).

    Args:
        backend: the detector (`trainer.backends.base.DetectorBackend`).
        selector: the batch selector (`selector.BatchSelector`), or None for real-only
            training (``method="none"``: only `train_real` is available). BSGAL needs its
            gradient cache; baselines (accept-all, random, field threshold) decide without
            gradients; a selector whose ``uses_lookahead`` is set (``method="lookahead"``) gets
            the exact look-ahead gain.
        mode: ``"faithful"`` (the only mode left; see `REMOVED_MODES`).
    """

    def __init__(self, backend: DetectorBackend, selector: BatchSelector | None,
                 mode: str = "faithful") -> None:
        if mode in REMOVED_MODES:
            raise ValueError(f"selection mode {mode!r}: {REMOVED_MODES[mode]}")
        if mode not in MODES:
            raise ValueError(f"selection mode {mode!r} is unknown; use one of {MODES}")
        self.backend = backend
        self.selector = selector
        self.mode = mode

    @property
    def score_params(self) -> list[torch.nn.Parameter]:
        """The parameters BSGAL gradients are taken over: those of the selector's cache."""
        if self.selector is not None and self.selector.cache is not None:
            return list(self.selector.cache.layout.params)
        return self.backend.trainable_parameters()

    # -- plain training ---------------------------------------------------------------------

    def train_real(self, samples: Sequence[dict[str, Any]], step: int) -> dict[str, float]:
        """Backward of the stock loss on real samples (gradients into ``param.grad``)."""
        images, targets = real_inputs(samples, self.backend.device)
        return self._backward_stock(images, targets, step, "real")

    def _backward_stock(self, images: list[Tensor], targets: list[dict[str, Tensor]], step: int,
                        batch: str) -> dict[str, float]:
        split = self.backend.losses(images, targets)
        stock = split.stock
        check_finite(stock, step, batch)
        torch.stack(list(stock.values())).sum().backward()
        return {k: float(v.detach()) for k, v in stock.items()}

    # -- steps with generated instances -----------------------------------------------------

    def run(self, step: int, pasted: Sequence[PastedImage],
            real_test: Sequence[dict[str, Any]] | None = None, *,
            class_ids: Sequence[int] = (), fields: Mapping[str, Any] | None = None,
            lookahead_lr: float | None = None) -> StepOutcome:
        """One step on a pasted batch.

        Args:
            step: the training iteration (recorded in the decision).
            pasted: the pasted batch (with originals).
            real_test: the real "test" samples (faithful BSGAL and look-ahead only).
            class_ids: category ids of the batch's generated instances (for per-class policies).
            fields: candidate fields for field-threshold baselines (name → values).
            lookahead_lr: step size of the exact look-ahead (``lookahead`` method only).
        """
        num_generated = sum(p.num_generated for p in pasted)
        if self.selector is None:
            raise ValueError("no selector (method 'none'): train on real images only with "
                             "train_real(); generated candidates cannot be judged")
        return self._faithful(step, pasted, real_test, num_generated, class_ids, fields,
                              lookahead_lr)

    def _outcome(self, decision: Any, trained_on: str, losses: dict[str, float],
                 num_generated: int) -> StepOutcome:
        return StepOutcome(
            accepted=bool(decision.accepted), reason=str(decision.reason), trained_on=trained_on,
            score=nan_if_none(decision.score), threshold=nan_if_none(decision.threshold),
            cache_norm=nan_if_none(decision.cache_norm), policy=str(decision.policy),
            losses=losses, num_generated=num_generated)

    def _nan_loss_outcome(self, trained_on: str, losses: dict[str, float],
                          num_generated: int) -> StepOutcome:
        cache = self.selector.cache if self.selector is not None else None
        return StepOutcome(False, INVALID_NAN_LOSS, trained_on,
                           cache_norm=math.nan if cache is None else cache.norm(),
                           policy=self.selector.policy.name if self.selector else "",
                           losses=losses, num_generated=num_generated)

    def _faithful(self, step: int, pasted: Sequence[PastedImage],
                  real_test: Sequence[dict[str, Any]] | None, num_generated: int,
                  class_ids: Sequence[int], fields: Mapping[str, Any] | None,
                  lookahead_lr: float | None) -> StepOutcome:
        selector = self.selector
        assert selector is not None
        device = self.backend.device
        decision: Any = None
        nan_loss = False
        if num_generated == 0:
            decision = selector.decide(step=step, num_generated=0)
        elif selector.needs_gradients:
            if not real_test:
                raise ValueError("faithful BSGAL needs the real test batch (real_test)")
            real_loss = self.backend.real_classification_loss(*real_inputs(real_test, device))
            selector.update_cache(parameter_gradients(real_loss, self.score_params), step=step)
            generated = self.backend.losses(*pasted_inputs(pasted, device), score_only=True)
            generated_loss = generated.generated[self.backend.classification_term]
            if math.isfinite(float(generated_loss.detach())):
                decision = selector.decide(
                    step=step, num_generated=num_generated,
                    candidate_grad=parameter_gradients(generated_loss, self.score_params),
                    class_ids=class_ids, fields=fields)
            else:
                nan_loss = True
        elif selector.uses_lookahead:
            decision = self._lookahead_decision(step, pasted, real_test, num_generated,
                                                class_ids, lookahead_lr)
        else:
            decision = selector.decide(step=step, num_generated=num_generated,
                                       class_ids=class_ids, fields=fields)
        if decision is not None and decision.accepted:
            losses = self._backward_stock(*pasted_inputs(pasted, device), step, "pasted")
            return self._outcome(decision, TRAINED_ON_PASTED, losses, num_generated)
        losses = self._backward_stock(*original_inputs(pasted, device), step, "original")
        if nan_loss:
            return self._nan_loss_outcome(TRAINED_ON_ORIGINAL, losses, num_generated)
        return self._outcome(decision, TRAINED_ON_ORIGINAL, losses, num_generated)

    def _lookahead_decision(self, step: int, pasted: Sequence[PastedImage],
                            real_test: Sequence[dict[str, Any]] | None, num_generated: int,
                            class_ids: Sequence[int], lr: float | None) -> Any:
        from selector import exact_lookahead_gain

        if not real_test or lr is None:
            raise ValueError("the look-ahead baseline needs real_test and lookahead_lr")
        device = self.backend.device
        pasted_batch = pasted_inputs(pasted, device)
        real_batch = real_inputs(real_test, device)
        result = exact_lookahead_gain(
            self.backend.trainable_parameters(),
            lambda: self.backend.losses(*pasted_batch, score_only=True).generated[
                self.backend.classification_term],
            lambda: self.backend.real_classification_loss(*real_batch),
            lr=lr, buffers=list(self.backend.module.buffers()))
        assert self.selector is not None
        return self.selector.decide(step=step, num_generated=num_generated, score=result.gain,
                                    class_ids=class_ids)

"""One training step with BSGAL selection: the gradients to apply and the decision on the batch.

`BsgalStep` follows the step interface of `trainer.step`: ``score`` (the decision on the pasted
batch), ``train`` (the pasted batch or its originals); ``run`` is the two in order, leaves the
gradients of the step in ``param.grad`` (the training loop clips them and steps the optimizer)
and returns a `trainer.step.StepResult` in which every pasted candidate gets the batch's
verdict.

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
from collections.abc import Callable, Sequence
from typing import Any

from selector import BatchSelector, parameter_gradients
from trainer.backends.base import DetectorBackend
from trainer.candidates import INVALID_NAN_LOSS, nan_if_none
from trainer.copy_paste import PastedImage
from trainer.real_data import pasted_inputs, real_inputs
from trainer.step import (
    PastedBatch,
    StepResult,
    TrainingStep,
    Verdict,
)

MODES = ("faithful",)
#: Why a mode that existed is gone (shown when someone asks for it).
REMOVED_MODES = {"efficient": "the batch-level efficient mode was removed: its head-only score "
                              "ranked batches no better than chance (Spearman -0.11 with the "
                              "exact look-ahead); use selection.granularity=instance, whose "
                              "per-candidate scoring costs ~1.3x a plain step"}


class BsgalStep(TrainingStep):
    """Computes one step's gradients and decision (module docstring).

    Args:
        backend: the detector (`trainer.backends.base.DetectorBackend`).
        selector: the batch selector (`selector.BatchSelector`). BSGAL needs its gradient
            cache; baselines (accept-all, random, field threshold) decide without gradients;
            a selector whose ``uses_lookahead`` is set (``method="lookahead"``) gets the exact
            look-ahead gain.
        mode: ``"faithful"`` (the only mode left; see `REMOVED_MODES`).
        real_batch_size: images of the real "test" batch (reference 4).
    """

    def __init__(self, backend: DetectorBackend, selector: BatchSelector,
                 mode: str = "faithful", real_batch_size: int = 4) -> None:
        self.check_mode(mode)
        super().__init__(backend)
        self.selector = selector
        self.mode = mode
        self.real_batch_size = int(real_batch_size)

    @staticmethod
    def check_mode(mode: str) -> None:
        """ValueError for a mode that is unknown or was removed (saying why)."""
        if mode in REMOVED_MODES:
            raise ValueError(f"selection mode {mode!r}: {REMOVED_MODES[mode]}")
        if mode not in MODES:
            raise ValueError(f"selection mode {mode!r} is unknown; use one of {MODES}")

    @property
    def needs_real_test(self) -> bool:
        """Faithful BSGAL and the exact look-ahead score against a real "test" batch."""
        return self.selector.needs_gradients or self.selector.uses_lookahead

    def real_test_for(self, step: int, class_ids: Sequence[int], covered: set[int]
                      ) -> tuple[list[int], int] | None:
        """``real_batch_size`` real images holding the pasted classes (the reference's 4)."""
        return (list(class_ids), self.real_batch_size) if self.needs_real_test else None

    @property
    def score_params(self) -> list[Any]:
        """The parameters BSGAL gradients are taken over: those of the selector's cache."""
        if self.selector.cache is not None:
            return list(self.selector.cache.layout.params)
        return self.backend.trainable_parameters()

    # -- the step --------------------------------------------------------------------------

    def run(self, step: int, batch: PastedBatch, *,
            rerender: Callable[[PastedImage, set[int]], PastedImage] | None = None,
            lookahead_lr: float | None = None) -> StepResult:
        """Score the pasted batch, then train on it if accepted, else on its originals.

        ``lookahead_lr`` is the step size of the exact look-ahead (``lookahead`` only)."""
        num_generated = sum(p.num_generated for p in batch.pasted)
        verdict = self.score(step, batch, num_generated, lookahead_lr)
        trained_on, losses = self.train(step, batch.pasted, verdict.accepted)
        return StepResult({c.position: verdict for c in batch.candidates}, trained_on, losses,
                          num_generated, verdict=verdict,
                          log={"accepted": verdict.accepted, "reason": verdict.reason,
                               "score": nan_if_none(verdict.score),
                               "threshold": nan_if_none(verdict.threshold)})

    def score(self, step: int, batch: PastedBatch, num_generated: int,
              lookahead_lr: float | None = None) -> Verdict:
        """The decision on the pasted batch (faithful passes 1 and 2)."""
        selector = self.selector
        device = self.backend.device
        fields, class_ids, real_test = batch.fields, batch.class_ids, batch.real_test
        if num_generated == 0:
            return Verdict.of(selector.decide(step=step, num_generated=0))
        if selector.needs_gradients:
            if not real_test:
                raise ValueError("faithful BSGAL needs the real test batch (real_test)")
            real_loss = self.backend.real_classification_loss(*real_inputs(real_test, device))
            selector.update_cache(parameter_gradients(real_loss, self.score_params), step=step)
            generated = self.backend.losses(*pasted_inputs(batch.pasted, device),
                                            score_only=True)
            generated_loss = generated.generated[self.backend.classification_term]
            if not math.isfinite(float(generated_loss.detach())):
                cache = selector.cache
                return Verdict(False, INVALID_NAN_LOSS,
                               cache_norm=None if cache is None else cache.norm())
            return Verdict.of(selector.decide(
                step=step, num_generated=num_generated,
                candidate_grad=parameter_gradients(generated_loss, self.score_params),
                class_ids=class_ids, fields=fields))
        if selector.uses_lookahead:
            return Verdict.of(self._lookahead_decision(step, batch, num_generated,
                                                       lookahead_lr))
        return Verdict.of(selector.decide(step=step, num_generated=num_generated,
                                          class_ids=class_ids, fields=fields))

    def train(self, step: int, pasted: Sequence[PastedImage], accepted: bool
              ) -> tuple[str, dict[str, float]]:
        """Faithful pass 3: the stock loss on the pasted batch if ``accepted``, else on the
        same real images without the pastes; returns (trained_on, losses)."""
        return self.train_on(step, pasted, pasted if accepted else None)

    def _lookahead_decision(self, step: int, batch: PastedBatch, num_generated: int,
                            lr: float | None) -> Any:
        from selector import exact_lookahead_gain

        if not batch.real_test or lr is None:
            raise ValueError("the look-ahead baseline needs real_test and lookahead_lr")
        device = self.backend.device
        pasted_batch = pasted_inputs(batch.pasted, device)
        real_batch = real_inputs(batch.real_test, device)
        result = exact_lookahead_gain(
            self.backend.trainable_parameters(),
            lambda: self.backend.losses(*pasted_batch, score_only=True).generated[
                self.backend.classification_term],
            lambda: self.backend.real_classification_loss(*real_batch),
            lr=lr, buffers=list(self.backend.module.buffers()))
        return self.selector.decide(step=step, num_generated=num_generated, score=result.gain,
                                    class_ids=batch.class_ids)

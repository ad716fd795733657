"""One training step with a decision per generated candidate (``selection.granularity: instance``).

`InstanceStep` follows the step interface of `trainer.step`: ``score`` (the signals, no
decision), ``decide`` (the selector), ``train`` (the accepted candidates only); ``run`` is the
three in order. Rows that cannot be judged say why: a real gradient of the candidate's class
that is not finite leaves that class's cache untouched and makes its candidates
``invalid_nan_real_grad``; a candidate loss that is not finite gives ``invalid_nan_score``.

1. Candidates pasted but not visible any more (covered by later pastes, or too small once
   resized) are ``invalid_not_visible``: there is nothing of them to judge or to train on.
2. The selector's quality gates reject candidates before any scoring (``rejected_quality``).
3. Scores of the remaining candidates k (label y_k), all at the current weights, in train mode,
   by the method's signal (`trainer.instance_signals`):

   - contribution (``bsgal``, ``composite``): the real "test" batch's box-classifier loss on its
     ground-truth boxes of class y, per class present among the candidates → its gradient →
     that class's cache; each candidate's own loss ℓ_k (the same classifier's cross-entropy on
     its own ground-truth box) → ∇ℓ_k → cosine with its class's cache. Over the box head and
     predictor (``score_parameters: heads``, default: the backbone runs once per batch without
     gradient, every per-instance gradient is a backward through two small layers) or over all
     trainable parameters (``all``: one full backward per candidate and per class, the
     reference the cheap one is measured against in benchmarks/instance_scores.py);
   - ``loss``: −ℓ_k, no gradient.

4. The training pass sees only the accepted candidates: the step's images are re-rendered from
   the same placements with the rejected candidates absent, pixel for pixel as if they had never
   been drawn (`trainer.copy_paste.CopyPaste.rerender`), and the stock Mask R-CNN loss is
   trained on them. No candidate accepted: the originals.

Each candidate's row keeps its own score, threshold, reason and cache norm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from selector.decision import INVALID_NOT_VISIBLE, Decision, invalid_decision
from selector.instance_selector import InstanceSelector
from trainer.backends.base import DetectorBackend
from trainer.candidates import Candidate
from trainer.copy_paste import PastedImage
from trainer.instance_scores import exact_gradients, flat, generated_instances
from trainer.instance_signals import (
    CandidateScore,
    RefreshCaches,
    ScoringInputs,
    score_signal,
)
from trainer.real_data import pasted_inputs, real_inputs
from trainer.step import (
    PastedBatch,
    StepResult,
    TrainingStep,
    Verdict,
)

SCORE_PARAMETERS = ("heads", "all")


class InstanceStep(TrainingStep):
    """Scores, decides and trains one instance-level step (module docstring).

    Args:
        backend: the detector.
        selector: the `selector.instance_selector.InstanceSelector`.
        score_parameters: ``"heads"`` (default) or ``"all"``.
    """

    def __init__(self, backend: DetectorBackend, selector: InstanceSelector,
                 score_parameters: str = "heads") -> None:
        if score_parameters not in SCORE_PARAMETERS:
            raise ValueError(f"selection.score_parameters {score_parameters!r} is unknown; use "
                             f"one of {SCORE_PARAMETERS}")
        super().__init__(backend)
        self.selector = selector
        self.score_parameters = score_parameters
        self.signal = score_signal(selector.signal) if selector.signal else None
        if self.signal is not None and self.signal.uses_caches and selector.caches is None:
            raise ValueError(f"method {selector.method!r} scores with the {self.signal.name} "
                             "signal, which needs the class gradient caches")

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What the contribution gradients are taken over."""
        if self.score_parameters == "heads":
            return self.backend.classifier_parameters()
        return self.backend.trainable_parameters()

    @property
    def needs_real_test(self) -> bool:
        return self.signal is not None and self.signal.uses_caches

    # -- the step --------------------------------------------------------------------------

    def run(self, step: int, batch: PastedBatch, *,
            rerender: Callable[[PastedImage, set[int]], PastedImage],
            lookahead_lr: float | None = None) -> StepResult:
        """Score, decide and train on ``batch``; leaves the training gradients."""
        started = time.perf_counter()
        real_test = batch.real_test

        def refresh(labels: Mapping[int, int]) -> set[int]:
            if not real_test:
                raise ValueError("contribution scores need the real 'test' batch")
            return self.update_caches(real_test, labels)

        scored = self.score(batch.pasted, batch.candidates, refresh)
        decisions = self.decide(step, batch.candidates, scored)
        keep = {p for p, d in decisions.items() if d.accepted}
        score_seconds = time.perf_counter() - started
        trained_on, losses = self.train(step, batch.pasted, keep, rerender)
        verdicts = {p: Verdict.of(d) for p, d in decisions.items()}
        return StepResult(verdicts, trained_on, losses, len(generated_instances(batch.pasted)),
                          score_seconds, log={"accepted": bool(keep),
                                              "num_accepted": len(keep)})

    def score(self, pasted: Sequence[PastedImage], candidates: Sequence[Candidate],
              refresh: RefreshCaches | None) -> dict[int, CandidateScore]:
        """The method's signal for every candidate that can be scored: not visible any more →
        ``invalid_not_visible``; failing a gate → no entry (the gate decides); else the
        signal's `CandidateScore`. ``refresh`` brings the real gradients of the classes about
        to be scored into their caches (signals that use caches)."""
        instances = generated_instances(pasted)
        row_of = {int(p): int(r) for p, r in zip(instances.positions, instances.rows)}
        out = {c.position: CandidateScore(INVALID_NOT_VISIBLE) for c in candidates
               if c.position not in row_of}
        if self.signal is None:
            return out
        passing = [c for c in candidates
                   if c.position in row_of and self.selector.gate(c.fields) is None]
        if passing:
            images, targets = pasted_inputs(pasted, self.backend.device)
            out.update(self.signal.score(self, ScoringInputs(images, targets, row_of),
                                         passing, refresh))
        return out

    def decide(self, step: int, candidates: Sequence[Candidate],
               scored: Mapping[int, CandidateScore]) -> dict[int, Decision]:
        """One decision per candidate: its reason where it could not be scored, else the
        selector's (gates, then the threshold on the scores, in candidate order)."""
        policy = self.selector.policy_name
        decisions = {c.position: invalid_decision(scored[c.position].reason, step=step,
                                                  policy=policy)
                     for c in candidates if c.position in scored and scored[c.position].reason}
        judged = [c for c in candidates if c.position not in decisions]
        none = CandidateScore()
        verdicts = self.selector.decide(
            step=step, class_ids=[c.class_id for c in judged], fields=[c.fields for c in judged],
            scores=[scored.get(c.position, none).score for c in judged],
            cache_norms=[scored.get(c.position, none).cache_norm for c in judged])
        decisions.update({c.position: d for c, d in zip(judged, verdicts)})
        return decisions

    def train(self, step: int, pasted: Sequence[PastedImage], keep: set[int],
              rerender: Callable[[PastedImage, set[int]], PastedImage]
              ) -> tuple[str, dict[str, float]]:
        """The stock loss on the images re-rendered with the ``keep`` candidates only (the
        originals when none is kept); returns (trained_on, losses)."""
        trained = [rerender(p, keep) for p in pasted] if keep else None
        return self.train_on(step, pasted, trained)

    # -- scoring ---------------------------------------------------------------------------

    def instance_losses(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                         rows: list[int], labels: list[int]) -> torch.Tensor:
        """K losses ℓ_k of the candidates at ``rows`` (attached to `params`)."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        if self.score_parameters == "heads":
            pooled = self.backend.gt_box_head_inputs(images, targets)[index]
            return self.backend.head_losses(pooled, torch.as_tensor(labels, dtype=torch.int64,
                                                                    device=pooled.device))
        return self.backend.gt_box_losses(images, targets)[index.to(self.backend.device)]

    def instance_gradients(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                            rows: list[int], labels: list[int]) -> torch.Tensor:
        """K x P gradients ∇ℓ_k over `params`."""
        with torch.enable_grad():
            return exact_gradients(self.instance_losses(images, targets, rows, labels),
                                   self.params)

    def update_caches(self, real_test: Sequence[dict[str, Any]], labels: dict[int, int]
                       ) -> set[int]:
        """Fold each candidate class's real gradient (its boxes in the real "test" batch) into
        that class's cache; a class without a real box this step keeps its cache as it is.
        Returns the classes whose real gradient was not finite (their caches are untouched;
        their candidates are ``invalid_nan_real_grad``)."""
        caches = self.selector.caches
        assert caches is not None
        images, targets = real_inputs(real_test, self.backend.device)
        real_labels = torch.cat([t["labels"] for t in targets])
        params = self.params
        if self.score_parameters == "heads":
            pooled = self.backend.gt_box_head_inputs(images, targets)
            losses = self.backend.head_losses(pooled, real_labels.to(pooled.device))
        else:
            losses = self.backend.gt_box_losses(images, targets)
        poisoned = set()
        for class_id, label in sorted(labels.items()):
            picked = (real_labels == label).to(losses.device)
            if not bool(picked.any()):
                continue
            grads = torch.autograd.grad(losses[picked].mean(), params, retain_graph=True,
                                        allow_unused=True)
            if caches.update(class_id, flat(grads, params)) is not None:
                poisoned.add(class_id)
        return poisoned

"""One training step with a decision per generated candidate (``selection.granularity: instance``).

Rows that cannot be judged say why: a real gradient of the candidate's class that is not finite
leaves that class's cache untouched and makes its candidates ``invalid_nan_real_grad``; a
candidate loss that is not finite gives ``invalid_nan_score``.

1. Candidates pasted but not visible any more (covered by later pastes, or too small once
   resized) are ``invalid_not_visible``: there is nothing of them to judge or to train on.
2. The selector's quality gates reject candidates before any scoring (``rejected_quality``).
3. Scores of the remaining candidates k (label y_k), all at the current weights, in train mode:

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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from selector.decision import (
    INVALID_NAN_REAL_GRAD,
    INVALID_NOT_VISIBLE,
    Decision,
    invalid_decision,
)
from selector.instance_selector import InstanceSelector
from trainer.backends.base import DetectorBackend
from trainer.bsgal_step import TRAINED_ON_ORIGINAL, TRAINED_ON_PASTED, check_finite
from trainer.candidates import Candidate
from trainer.copy_paste import PastedImage
from trainer.instance_scores import exact_gradients, flat, generated_instances
from trainer.real_data import original_inputs, pasted_inputs, real_inputs

SCORE_PARAMETERS = ("heads", "all")


@dataclass
class InstanceOutcome:
    """What one instance-level step decided and trained on.

    Attributes:
        decisions: candidate position → its `selector.Decision`.
        trained_on: ``"pasted"`` (the accepted candidates re-rendered) or ``"original"``.
        losses: the trained loss terms (floats).
        num_generated: visible generated instances before the decision.
        num_accepted: candidates accepted (all visible; the trained images hold them).
        score_seconds: wall time of the scoring and the decisions (the rest of the step is
            training: re-rendering, the stock loss and its backward).
    """

    decisions: dict[int, Decision]
    trained_on: str
    losses: dict[str, float] = field(default_factory=dict)
    num_generated: int = 0
    num_accepted: int = 0
    score_seconds: float = 0.0


class InstanceStep:
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
        self.backend = backend
        self.selector = selector
        self.score_parameters = score_parameters

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What the contribution gradients are taken over."""
        if self.score_parameters == "heads":
            return self.backend.classifier_parameters()
        return self.backend.trainable_parameters()

    def run(self, step: int, pasted: Sequence[PastedImage], candidates: Sequence[Candidate],
            real_test: Sequence[dict[str, Any]] | None,
            rerender: Callable[[PastedImage, set[int]], PastedImage]) -> InstanceOutcome:
        """Decide on every candidate of ``pasted`` and leave the training gradients."""
        started = time.perf_counter()
        device = self.backend.device
        instances = generated_instances(pasted)
        row_of = {int(p): int(r) for p, r in zip(instances.positions, instances.rows)}
        decisions: dict[int, Decision] = {}
        visible = [c for c in candidates if c.position in row_of]
        for c in candidates:
            if c.position not in row_of:
                decisions[c.position] = invalid_decision(INVALID_NOT_VISIBLE, step=step,
                                                         policy=self.selector.policy_name)
        scores: list[float | None] | None = None
        norms: list[float | None] | None = None
        if visible and (self.selector.needs_contribution or self.selector.needs_loss):
            passing = [c for c in visible if self.selector.gate(c.fields) is None]
            images, targets = pasted_inputs(pasted, device)
            by_position: dict[int, tuple[float | None, float | None]] = {}
            if passing and self.selector.needs_contribution:
                if not real_test:
                    raise ValueError("contribution scores need the real 'test' batch")
                poisoned = self.update_caches(real_test, {c.class_id: c.label for c in passing})
                for c in [c for c in passing if c.class_id in poisoned]:
                    decisions[c.position] = invalid_decision(INVALID_NAN_REAL_GRAD, step=step,
                                                             policy=self.selector.policy_name)
                passing = [c for c in passing if c.class_id not in poisoned]
                visible = [c for c in visible if c.position not in decisions]
                grads = self.instance_gradients(images, targets,
                                                 [row_of[c.position] for c in passing],
                                                 [c.label for c in passing])
                for c, g in zip(passing, grads):
                    by_position[c.position] = self.selector.contribution(c.class_id, g)
            elif passing:  # loss
                with torch.no_grad():
                    own_losses = self.instance_losses(images, targets,
                                                       [row_of[c.position] for c in passing],
                                                       [c.label for c in passing])
                for c, loss in zip(passing, own_losses.tolist()):
                    by_position[c.position] = (-loss, None)
            scores = [by_position.get(c.position, (math.nan, None))[0] for c in visible]
            norms = [by_position.get(c.position, (None, None))[1] for c in visible]
        judged = self.selector.decide(step=step, class_ids=[c.class_id for c in visible],
                                      fields=[c.fields for c in visible], scores=scores,
                                      cache_norms=norms)
        for c, d in zip(visible, judged):
            decisions[c.position] = d
        keep = {p for p, d in decisions.items() if d.accepted}
        score_seconds = time.perf_counter() - started
        if keep:
            trained = [rerender(p, keep) for p in pasted]
            losses = self._backward_stock(*pasted_inputs(trained, device), step, "pasted")
            trained_on = TRAINED_ON_PASTED
        else:
            losses = self._backward_stock(*original_inputs(pasted, device), step, "original")
            trained_on = TRAINED_ON_ORIGINAL
        return InstanceOutcome(decisions, trained_on, losses, len(instances), len(keep),
                               score_seconds)

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

    # -- training --------------------------------------------------------------------------

    def _backward_stock(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                        step: int, batch: str) -> dict[str, float]:
        split = self.backend.losses(images, targets)
        check_finite(split.stock, step, batch)
        torch.stack(list(split.stock.values())).sum().backward()
        return {k: float(v.detach()) for k, v in split.stock.items()}

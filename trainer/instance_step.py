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

from selector.class_sketch import InputBasis, SketchedClassCaches
from selector.decision import INVALID_NOT_VISIBLE, Decision, invalid_decision
from selector.instance_selector import InstanceSelector
from trainer.backends.base import DetectorBackend
from trainer.candidates import Candidate
from trainer.copy_paste import PastedImage
from trainer.head_factors import head_factors, linear_layers
from trainer.instance_scores import exact_gradients, flat, generated_instances
from trainer.instance_signals import (
    CandidateScore,
    RefreshCaches,
    ScoringInputs,
    score_signal,
)
from trainer.real_data import pasted_inputs, real_inputs
from trainer.step import (
    CALIBRATION_POSITIONS,
    PastedBatch,
    StepResult,
    TrainingStep,
    Verdict,
)

SCORE_PARAMETERS = ("heads", "all")
#: Where the class caches' real gradients come from (docs/algorithm.md, Real gradients):
#: ``training_batch``: the real boxes of the step's own images (every class present), plus a
#: bounded top-up of real images for candidate classes whose cache is empty or stale;
#: ``test_batch``: an extra real "test" batch each step holding the candidates' classes (the
#: reference's, at least one image per candidate class).
REAL_GRADIENTS = ("training_batch", "test_batch")
#: Draws the real images the input bases are fitted on: ``(count, refresh index) -> samples``
#: (the same on every rank).
BasisSource = Callable[[int, int], list[dict[str, Any]]]


class InstanceStep(TrainingStep):
    """Scores, decides and trains one instance-level step (module docstring).

    Args:
        backend: the detector.
        selector: the `selector.instance_selector.InstanceSelector`.
        score_parameters: ``"heads"`` (default) or ``"all"``.
        class_of_label: training label → category id (the cache keys of real boxes).
        real_gradients: one of `REAL_GRADIENTS`.
        real_batch_size: ``test_batch``: real images per step at least (one per candidate
            class at least).
        topup_images, cache_max_age: ``training_batch``: at most this many real images per
            step for the candidate classes whose cache is empty or older than ``cache_max_age``
            steps (and which the step's own images do not hold).
        basis_source, basis_images, basis_refresh_steps: sketched caches only: where the
            input bases' real images come from, how many, and every how many steps the bases
            are fitted again (the caches re-expressed in them; 0: never after the first).
        calibration_pastes: real instances pasted per step and scored as candidates for the
            calibrated threshold's reference (`trainer.loop.DetectorTrainer.calibration_pieces`;
            used only when the selector's threshold is calibrated).
    """

    def __init__(self, backend: DetectorBackend, selector: InstanceSelector,
                 score_parameters: str = "heads", *,
                 class_of_label: Mapping[int, int] | None = None,
                 real_gradients: str = "test_batch", real_batch_size: int = 4,
                 topup_images: int = 2, cache_max_age: int = 50,
                 basis_source: BasisSource | None = None, basis_images: int = 8,
                 basis_refresh_steps: int = 100, calibration_pastes: int = 0) -> None:
        if score_parameters not in SCORE_PARAMETERS:
            raise ValueError(f"selection.score_parameters {score_parameters!r} is unknown; use "
                             f"one of {SCORE_PARAMETERS}")
        if real_gradients not in REAL_GRADIENTS:
            raise ValueError(f"selection.real_gradients {real_gradients!r} is unknown; use one "
                             f"of {REAL_GRADIENTS}")
        super().__init__(backend)
        self.selector = selector
        self.score_parameters = score_parameters
        self.signal = score_signal(selector.signal) if selector.signal else None
        if self.signal is not None and self.signal.uses_caches and selector.caches is None:
            raise ValueError(f"method {selector.method!r} scores with the {self.signal.name} "
                             "signal, which needs the class gradient caches")
        self.sketched = isinstance(selector.caches, SketchedClassCaches)
        if self.sketched and score_parameters != "heads":
            raise ValueError("sketched class caches score the box head's linear layers: they "
                             "need selection.score_parameters=heads (or cache_sketch=none)")
        if real_gradients == "training_batch" and score_parameters != "heads":
            raise ValueError("selection.real_gradients=training_batch takes the real boxes' "
                             "gradients of the box head: it needs score_parameters=heads")
        self.class_of_label = dict(class_of_label or {})
        self.real_gradients = real_gradients
        self.real_batch_size = int(real_batch_size)
        self.topup_images = int(topup_images)
        self.cache_max_age = int(cache_max_age)
        self.layers = (linear_layers([("box_head", backend.module.roi_heads.box_head),
                                      ("box_predictor", backend.module.roi_heads.box_predictor)])
                       if self.sketched else [])
        self.basis_source = basis_source
        self.basis_images = int(basis_images)
        self.basis_refresh_steps = int(basis_refresh_steps)
        if calibration_pastes < 0:
            raise ValueError(f"selection.calibration_pastes={calibration_pastes} must be >= 0")
        if selector.calibrates and calibration_pastes == 0:
            raise ValueError("the calibrated threshold needs real instances to calibrate on: "
                             "set selection.calibration_pastes >= 1")
        self.calibration_pastes = int(calibration_pastes) if selector.calibrates else 0

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What the contribution gradients are taken over."""
        if self.score_parameters == "heads":
            return self.backend.classifier_parameters()
        return self.backend.trainable_parameters()

    @property
    def needs_real_test(self) -> bool:
        return self.signal is not None and self.signal.uses_caches

    def box_factors(self, pooled: torch.Tensor, labels: torch.Tensor) -> list[Any]:
        """The per-box gradient factors of the box classifier's linear layers."""
        _, factors = head_factors(self.backend.head_losses, pooled,
                                  labels.to(pooled.device), self.layers)
        return factors

    # -- the step --------------------------------------------------------------------------

    def run(self, step: int, batch: PastedBatch, *,
            rerender: Callable[[PastedImage, set[int]], PastedImage],
            lookahead_lr: float | None = None) -> StepResult:
        """Score, decide and train on ``batch``; leaves the training gradients."""
        started = time.perf_counter()
        real_test = batch.real_test

        def refresh(labels: Mapping[int, int], inputs: ScoringInputs) -> set[int]:
            if self.sketched:
                self.ensure_basis(step)
            if self.real_gradients == "test_batch":
                if not real_test:
                    raise ValueError("contribution scores need the real 'test' batch")
                return self.update_caches(real_test, labels, step=step)
            # The real boxes of the step's own images: every class present.
            real = ~inputs.generated
            poisoned = self.update_from_boxes(inputs, real, step=step)
            if real_test:  # the top-up for the candidates' stale classes
                poisoned |= self.update_caches(real_test, labels, step=step)
            return poisoned

        scored = self.score(batch.pasted, batch.candidates, refresh,
                            calibration=batch.calibration)
        self.observe_calibration(step, batch.calibration, scored)
        decisions = self.decide(step, batch.candidates, scored)
        keep = {p for p, d in decisions.items() if d.accepted}
        score_seconds = time.perf_counter() - started
        trained_on, losses = self.train(step, batch.pasted, keep, rerender)
        verdicts = {p: Verdict.of(d) for p, d in decisions.items()}
        generated = generated_instances(batch.pasted).positions
        num_generated = int((generated < CALIBRATION_POSITIONS).sum())
        return StepResult(verdicts, trained_on, losses, num_generated,
                          score_seconds, log={"accepted": bool(keep),
                                              "num_accepted": len(keep),
                                              "topup_images": len(real_test or ()),
                                              "calibration_pieces": len(batch.calibration)})

    def real_test_for(self, step: int, class_ids: Sequence[int], covered: set[int]
                      ) -> tuple[list[int], int] | None:
        """``test_batch``: max(real_batch_size, candidate classes) images holding them;
        ``training_batch``: a top-up of at most ``topup_images`` for the stale classes."""
        if not self.needs_real_test:
            return None
        if self.real_gradients == "test_batch":
            return list(class_ids), max(self.real_batch_size, len(set(class_ids)))
        stale = self.stale_classes(class_ids, covered, step, self.cache_max_age)
        return (stale, min(self.topup_images, len(stale))) if stale else None

    def stale_classes(self, class_ids: Sequence[int], covered: set[int], step: int,
                      max_age: int) -> list[int]:
        """The candidate classes whose cache is empty or older than ``max_age`` steps and that
        the step's own images do not hold (``covered``): the ones a top-up draw is for, empty
        ones first, then the oldest."""
        caches = self.selector.caches
        ages = {}
        for cid in dict.fromkeys(int(c) for c in class_ids):
            age = None if caches is None else caches.age(cid, step)
            if cid not in covered and (age is None or age > max_age):
                ages[cid] = age
        # Empty caches first (their candidates cannot be scored at all), then the oldest.
        return sorted(ages, key=lambda c: (ages[c] is not None, -(ages[c] or 0)))

    def score(self, pasted: Sequence[PastedImage], candidates: Sequence[Candidate],
              refresh: RefreshCaches | None, *, calibration: Sequence[Candidate] = ()
              ) -> dict[int, CandidateScore]:
        """The method's signal for every candidate that can be scored: not visible any more →
        ``invalid_not_visible``; failing a gate → no entry (the gate decides); else the
        signal's `CandidateScore`. ``refresh`` brings the real gradients of the classes about
        to be scored into their caches (signals that use caches). The ``calibration`` pieces
        (real instances) are scored in the same pass, against the same caches, without gates
        (real instances are good by definition)."""
        instances = generated_instances(pasted)
        row_of = {int(p): int(r) for p, r in zip(instances.positions, instances.rows)}
        out = {c.position: CandidateScore(INVALID_NOT_VISIBLE) for c in candidates
               if c.position not in row_of}
        if self.signal is None:
            return out
        passing = [c for c in candidates
                   if c.position in row_of and self.selector.gate(c.fields) is None]
        passing += [c for c in calibration if c.position in row_of]
        if passing:
            images, targets = pasted_inputs(pasted, self.backend.device)
            out.update(self.signal.score(self, ScoringInputs(images, targets, row_of),
                                         passing, refresh))
        return out

    def observe_calibration(self, step: int, calibration: Sequence[Candidate],
                            scored: Mapping[int, CandidateScore]) -> None:
        """The scores of the step's real calibration pieces into the calibrated threshold's
        reference, by class, before the step's candidates are decided (pieces hidden by a
        candidate or whose score is not finite say nothing and are left out)."""
        by_class: dict[int, list[float]] = {}
        for piece in calibration:
            result = scored.get(piece.position)
            if result is not None and not result.reason and result.score is not None:
                by_class.setdefault(piece.class_id, []).append(float(result.score))
        for class_id, values in by_class.items():
            self.selector.observe_reference(class_id, values, step=step)

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

    def update_caches(self, real_test: Sequence[dict[str, Any]], labels: Mapping[int, int],
                      *, step: int = 0) -> set[int]:
        """Fold each of the classes ``labels`` names ({class id: label}) real gradient (its
        boxes in the real samples ``real_test``) into that class's cache; a class without a
        real box there keeps its cache as it is. Returns the classes whose real gradient was
        not finite (their caches are untouched; their candidates are
        ``invalid_nan_real_grad``)."""
        images, targets = real_inputs(real_test, self.backend.device)
        inputs = ScoringInputs(images, targets, {})
        wanted = set(labels.values())
        picked = torch.tensor([int(v) in wanted for v in inputs.labels.tolist()],
                              dtype=torch.bool)
        if self.score_parameters != "heads":
            return self._update_all_parameters(images, targets, labels, step)
        return self.update_from_boxes(inputs, picked, step=step,
                                      class_of_label={v: k for k, v in labels.items()})

    def update_from_boxes(self, inputs: ScoringInputs, picked: torch.Tensor, *, step: int,
                          class_of_label: Mapping[int, int] | None = None) -> set[int]:
        """Fold the real gradient of every class among the ``picked`` boxes of ``inputs`` (the
        mean over its boxes of the box classifier's loss gradient) into its cache; returns the
        classes whose gradient was not finite."""
        caches = self.selector.caches
        assert caches is not None
        names = class_of_label if class_of_label is not None else self.class_of_label
        labels = inputs.labels
        picked = picked.to(labels.device)
        present = sorted({int(v) for v in labels[picked].tolist()})
        if not present:
            return set()
        poisoned = set()
        if self.sketched:
            factors = inputs.factors(self)
            for label in present:
                rows = torch.nonzero(picked & (labels == label)).flatten()
                cid = names.get(label)
                if cid is not None and caches.update(cid, [f.rows(rows) for f in factors],
                                                     step=step) is not None:
                    poisoned.add(cid)
            return poisoned
        pooled = inputs.pooled(self)
        params = self.params
        with torch.enable_grad():
            losses = self.backend.head_losses(pooled, labels.to(pooled.device))
            for label in present:
                cid = names.get(label)
                if cid is None:
                    continue
                chosen = (picked & (labels == label)).to(losses.device)
                grads = torch.autograd.grad(losses[chosen].mean(), params, retain_graph=True,
                                            allow_unused=True)
                if caches.update(cid, flat(grads, params), step=step) is not None:
                    poisoned.add(cid)
        return poisoned

    def _update_all_parameters(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                               labels: Mapping[int, int], step: int) -> set[int]:
        """``score_parameters: all``: the real gradient over every trainable parameter."""
        caches = self.selector.caches
        assert caches is not None
        real_labels = torch.cat([t["labels"] for t in targets])
        losses = self.backend.gt_box_losses(images, targets)
        params = self.params
        poisoned = set()
        for class_id, label in sorted(labels.items()):
            picked = (real_labels == label).to(losses.device)
            if not bool(picked.any()):
                continue
            grads = torch.autograd.grad(losses[picked].mean(), params, retain_graph=True,
                                        allow_unused=True)
            if caches.update(class_id, flat(grads, params), step=step) is not None:
                poisoned.add(class_id)
        return poisoned

    # -- sketched caches: the input bases --------------------------------------------------

    def ensure_basis(self, step: int, *, refresh: bool = True) -> None:
        """Fit the input bases when there are none, and again every ``basis_refresh_steps``
        (the caches re-expressed in the new ones), from ``basis_images`` real images drawn the
        same way on every rank (and broadcast from rank 0 under torch.distributed)."""
        caches = self.selector.caches
        assert isinstance(caches, SketchedClassCaches)
        index = step // self.basis_refresh_steps if self.basis_refresh_steps > 0 else 0
        if caches.basis is not None and (not refresh or index <= caches.basis_index):
            return
        if self.basis_source is None:
            raise ValueError("sketched class caches need real images to fit their input bases "
                             "(basis_source)")
        index = step // self.basis_refresh_steps if self.basis_refresh_steps > 0 else 0
        samples = self.basis_source(self.basis_images, index)
        images, targets = real_inputs(samples, self.backend.device)
        inputs = ScoringInputs(images, targets, {})
        basis = InputBasis.fit(inputs.factors(self), caches.rank)
        basis = _broadcast(basis)
        caches.set_basis(basis, index=index)


def _broadcast(basis: InputBasis) -> InputBasis:
    """Rank 0's bases on every rank (a no-op without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return basis
    for name in sorted(basis.bases):
        dist.broadcast(basis.bases[name], src=0)
    return basis

"""The per-candidate scores an instance-level method decides on, by name (``signal`` in
`selector.methods`).

A signal scores the candidates of one pasted batch that passed the gates, at the current
weights, in train mode, and never decides: it returns per candidate a `CandidateScore` (a score
and the norm of the cache it was scored against, or a reason why it could not be scored). The
decision (gates, thresholds) is the selector's.

=============  ======  ===========================================================
signal         caches  score of candidate k (label y_k)
=============  ======  ===========================================================
contribution   yes     cos(c_y, ∇ℓ_k): the BSGAL contribution against its class's cache
loss           no      −ℓ_k: minus the detector's own classification loss on it
=============  ======  ===========================================================

ℓ_k is the box classifier's cross-entropy on the candidate's own ground-truth box
(`trainer.instance_scores`). A new signal is one class here with `register_signal`, plus a
method that names it in `selector.methods`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from selector.decision import INVALID_NAN_REAL_GRAD
from trainer.candidates import Candidate

#: ``(candidates' {class_id: label}, the batch's scoring inputs) -> the classes whose real
#: gradient was not finite`` (their caches untouched). Training folds the real boxes of the
#: step's own images (and a bounded top-up of real images for stale classes) into the caches;
#: rescoring computes each class's cache once at fixed weights.
RefreshCaches = Callable[[Mapping[int, int], "ScoringInputs"], set[int]]


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's signal: ``reason`` non-empty when it could not be scored (an
    ``invalid_*`` reason); else ``score`` (None: its class has no cache yet) and the norm of the
    cache it was scored against."""

    reason: str = ""
    score: float | None = None
    cache_norm: float | None = None


@dataclass
class ScoringInputs:
    """The pasted batch as the detector takes it, where each candidate's box is, and (computed
    once, on first use) the box head's inputs and per-box gradient factors of all its boxes.

    Attributes:
        images, targets: the model inputs of the pasted images (`trainer.real_data`).
        row_of: candidate position → its index among the batch's ground-truth boxes.
    """

    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    row_of: dict[int, int]
    _pooled: torch.Tensor | None = None
    _factors: list[Any] | None = None

    @property
    def labels(self) -> torch.Tensor:
        """N training labels of all the batch's boxes (real and generated)."""
        return torch.cat([t["labels"] for t in self.targets])

    @property
    def generated(self) -> torch.Tensor:
        """N bools: which boxes are pasted candidates."""
        return torch.cat([t["generated"].bool() for t in self.targets])

    def pooled(self, step: "ScoringStep") -> torch.Tensor:
        """N x ...: the box head's RoI-pooled inputs at every box (one backbone forward)."""
        if self._pooled is None:
            self._pooled = step.backend.gt_box_head_inputs(self.images, self.targets)
        return self._pooled

    def factors(self, step: "ScoringStep") -> list[Any]:
        """The per-box gradient factors of every box (`trainer.head_factors`)."""
        if self._factors is None:
            self._factors = step.box_factors(self.pooled(step), self.labels)
        return self._factors


class ScoringStep(Protocol):
    """What a signal uses of `trainer.instance_step.InstanceStep`."""

    selector: Any
    backend: Any
    sketched: bool

    def box_factors(self, pooled: torch.Tensor, labels: torch.Tensor) -> list[Any]: ...

    def instance_losses(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                        rows: list[int], labels: list[int]) -> torch.Tensor: ...

    def instance_gradients(self, images: list[torch.Tensor], targets: list[dict[str, Any]],
                           rows: list[int], labels: list[int]) -> torch.Tensor: ...


class ScoreSignal:
    """A per-candidate score (module docstring).

    Attributes:
        name: the name methods give as their ``signal``.
        uses_caches: the selector needs the class gradient caches for it.
    """

    name = ""
    uses_caches = False

    def score(self, step: ScoringStep, inputs: ScoringInputs, passing: Sequence[Candidate],
              refresh: RefreshCaches | None) -> dict[int, CandidateScore]:
        raise NotImplementedError


class ContributionSignal(ScoreSignal):
    """cos(c_y, ∇ℓ_k) against the cache of the candidate's class (refreshed first)."""

    name = "contribution"
    uses_caches = True

    def score(self, step: ScoringStep, inputs: ScoringInputs, passing: Sequence[Candidate],
              refresh: RefreshCaches | None) -> dict[int, CandidateScore]:
        if refresh is None:
            raise ValueError("contribution scores need the real gradients of the candidates' "
                             "classes (the real 'test' batch)")
        poisoned = refresh({c.class_id: c.label for c in passing}, inputs)
        out = {c.position: CandidateScore(INVALID_NAN_REAL_GRAD) for c in passing
               if c.class_id in poisoned}
        scored = [c for c in passing if c.class_id not in poisoned]
        by_class: dict[int, list[Candidate]] = {}
        for c in scored:
            by_class.setdefault(c.class_id, []).append(c)
        if step.sketched:  # the candidates' own boxes' factors, no per-candidate backward
            factors = inputs.factors(step)
            candidates: dict[int, Any] = {
                cid: [f.rows([inputs.row_of[c.position] for c in group]) for f in factors]
                for cid, group in by_class.items()}
        else:
            grads = step.instance_gradients(inputs.images, inputs.targets,
                                            [inputs.row_of[c.position] for c in scored],
                                            [c.label for c in scored])
            index = {c.position: k for k, c in enumerate(scored)}
            candidates = {cid: grads[[index[c.position] for c in group]]
                          for cid, group in by_class.items()}
        for cid, group in by_class.items():
            values, norm = step.selector.contributions(cid, candidates[cid])
            for k, c in enumerate(group):
                out[c.position] = CandidateScore("", None if values is None else values[k],
                                                 norm)
        return out


class LossSignal(ScoreSignal):
    """−ℓ_k: minus the candidate's own classification loss (no gradient)."""

    name = "loss"

    def score(self, step: ScoringStep, inputs: ScoringInputs, passing: Sequence[Candidate],
              refresh: RefreshCaches | None) -> dict[int, CandidateScore]:
        with torch.no_grad():
            losses = step.instance_losses(inputs.images, inputs.targets,
                                          [inputs.row_of[c.position] for c in passing],
                                          [c.label for c in passing]).tolist()
        return {c.position: CandidateScore("", -float(loss)) for c, loss in zip(passing, losses)}


_SIGNALS: dict[str, ScoreSignal] = {}


def register_signal(signal: ScoreSignal) -> ScoreSignal:
    """Make ``signal`` available to methods that name it."""
    if not signal.name:
        raise ValueError("a score signal needs a name")
    _SIGNALS[signal.name] = signal
    return signal


def unregister_signal(name: str) -> None:
    _SIGNALS.pop(name, None)


def score_signal(name: str) -> ScoreSignal:
    """The signal called ``name``; ValueError naming the registered ones."""
    found = _SIGNALS.get(name)
    if found is None:
        raise ValueError(f"score signal {name!r} is not registered; known: {sorted(_SIGNALS)} "
                         "(trainer.instance_signals.register_signal)")
    return found


register_signal(ContributionSignal())
register_signal(LossSignal())

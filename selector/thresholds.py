"""Threshold policies: turn a batch's score into accept / reject.

All policies share one interface (`SelectionPolicy`):

    decision = policy.decide(score, step=step, class_ids=class_ids, fields=fields)

and checkpoint through ``state_dict()`` / ``load_state_dict()`` (plain lists, floats, strings and
tensors, loadable with ``torch.load(weights_only=True)``).

BSGAL's rules, as in the reference:

- `FixedThreshold`: accept when score ≥ threshold (reference: cosine ≥ −0.05).
- `DynamicPercentileThreshold`: threshold = the (1 − r) quantile of the last N valid scores
  (reference N = 1000, numpy's linear-interpolation percentile), taken *before* the current score
  joins the window, so that roughly a fraction r of batches is kept. With an empty window the
  threshold is 0.0 (the reference's value).
- `LinearKeepFraction`: r ramps linearly from ``start`` to ``end`` over ``total_steps``
  (reference: r = start + (end − start)·iter/max_iter).

Option beyond the reference: `RareClassMinAcceptRate` wraps any policy and overrides a rejection
when it would push a rare class's running acceptance rate below a floor.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from selector.decision import ACCEPTED, Decision, threshold_decision


@runtime_checkable
class SelectionPolicy(Protocol):
    """Decides one batch. ``score`` may be None for policies that do not use it."""

    name: str

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _require_score(score: float | None, policy: str) -> float:
    if score is None:
        raise ValueError(f"the {policy} policy needs a score; got None")
    return float(score)


class FixedThreshold:
    """Accept when score ≥ ``threshold`` (reference: cosine score, threshold −0.05).

    Args:
        threshold: the default threshold.
        class_thresholds: optional per-class thresholds; a batch uses the lowest threshold among
            its classes (the batch is kept for the sake of its most favoured class) and
            ``threshold`` for classes not listed.
        name: the policy name written into decisions (``"lookahead"`` when used for the exact
            look-ahead gain with threshold 0).
    """

    def __init__(self, threshold: float = -0.05, *,
                 class_thresholds: Mapping[int, float] | None = None,
                 name: str = "fixed_threshold") -> None:
        self.threshold = float(threshold)
        self.class_thresholds = {int(k): float(v) for k, v in (class_thresholds or {}).items()}
        self.name = name

    def threshold_for(self, class_ids: Sequence[int] = ()) -> float:
        return min((self.class_thresholds.get(int(c), self.threshold) for c in class_ids),
                   default=self.threshold)

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        score = _require_score(score, self.name)
        return threshold_decision(score, self.threshold_for(class_ids), step=step,
                                  policy=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless: everything is configuration

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class LinearKeepFraction:
    """Fraction of batches to keep, ramping linearly from ``start`` (step 0) to ``end``
    (step ``total_steps`` and after)."""

    start: float
    end: float
    total_steps: int

    def __post_init__(self) -> None:
        for label, value in (("start", self.start), ("end", self.end)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"keep fraction {label}={value} must be in (0, 1]")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps} must be positive (the length of "
                             "training in iterations)")

    def __call__(self, step: int) -> float:
        progress = min(max(step / self.total_steps, 0.0), 1.0)
        return self.start + (self.end - self.start) * progress


class DynamicPercentileThreshold:
    """Threshold at a percentile of recent scores, so that about a fraction r of batches is kept.

    The score being judged joins the window *before* the threshold is read, so the policy keeps
    about r from the first step on: the first score is its own threshold (accepted), and no
    constant stands in while the window fills. (The reference reads the window before adding the
    score and uses 0.0 while it is empty; on a short run whose cosines all exceed 0 that accepts
    everything until the window holds enough scores: measured, 53 % kept when 50 % was asked.)

    Args:
        keep_fraction: r in (0, 1], or a `LinearKeepFraction` schedule evaluated at ``step``.
        window: N, how many recent valid scores to remember (reference 1000).
    """

    name = "dynamic_percentile"

    def __init__(self, keep_fraction: float | LinearKeepFraction = 0.5, *,
                 window: int = 1000) -> None:
        if not isinstance(keep_fraction, LinearKeepFraction) and not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]: the fraction of "
                             "batches to accept")
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self.keep_fraction = keep_fraction
        self.window = int(window)
        self.scores: deque[float] = deque(maxlen=self.window)

    def keep_fraction_at(self, step: int) -> float:
        if isinstance(self.keep_fraction, LinearKeepFraction):
            return self.keep_fraction(step)
        return float(self.keep_fraction)

    def threshold(self, step: int) -> float:
        """The (1 − r) quantile of the window as it is (NaN while it is empty)."""
        if not self.scores:
            return math.nan
        quantile = 1.0 - self.keep_fraction_at(step)
        window = torch.tensor(list(self.scores), dtype=torch.float64)
        return float(torch.quantile(window, quantile))  # linear, like numpy.percentile

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        score = _require_score(score, self.name)
        if not math.isfinite(score):
            return threshold_decision(score, math.nan, step=step, policy=self.name)
        self.scores.append(score)
        return threshold_decision(score, self.threshold(step), step=step, policy=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "scores": list(self.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(f"checkpointed score window has size {state['window']}; this run uses "
                             f"window={self.window}")
        self.scores = deque((float(s) for s in state["scores"]), maxlen=self.window)


class RareClassMinAcceptRate:
    """Keep each listed (rare) class's acceptance rate at or above a floor.

    Wraps a policy. When the wrapped policy rejects a batch (``rejected_score``) that contains a
    listed class, and rejecting would drop that class's running acceptance rate (accepted batches
    containing it / batches containing it, this one included) below ``min_accept_rate``, the batch
    is accepted instead and the decision's policy reads ``"rare_class_min_accept_rate"``.
    Invalid decisions are passed through and not counted.

    Args:
        base: the policy whose decisions are overridden.
        class_ids: the classes to protect (e.g. LVIS rare classes).
        min_accept_rate: the floor, in [0, 1].
    """

    name = "rare_class_min_accept_rate"

    def __init__(self, base: SelectionPolicy, class_ids: Sequence[int],
                 min_accept_rate: float) -> None:
        if not 0.0 <= min_accept_rate <= 1.0:
            raise ValueError(f"min_accept_rate={min_accept_rate} must be in [0, 1]")
        self.base = base
        self.class_ids = frozenset(int(c) for c in class_ids)
        self.min_accept_rate = float(min_accept_rate)
        self.seen: dict[int, int] = {}
        self.accepted: dict[int, int] = {}

    def acceptance_rate(self, class_id: int) -> float | None:
        seen = self.seen.get(class_id, 0)
        return None if seen == 0 else self.accepted.get(class_id, 0) / seen

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        decision = self.base.decide(score, step=step, class_ids=class_ids, fields=fields)
        if decision.invalid:
            return decision
        protected = sorted({int(c) for c in class_ids} & self.class_ids)
        if not decision.accepted and any(
                self.accepted.get(c, 0) / (self.seen.get(c, 0) + 1) < self.min_accept_rate
                for c in protected):
            decision = Decision(accepted=True, reason=ACCEPTED, step=step, score=decision.score,
                                threshold=decision.threshold, policy=self.name)
        for c in protected:
            self.seen[c] = self.seen.get(c, 0) + 1
            self.accepted[c] = self.accepted.get(c, 0) + int(decision.accepted)
        return decision

    def state_dict(self) -> dict[str, Any]:
        classes = sorted(self.seen)
        return {
            "base": self.base.state_dict(),
            "class_ids": classes,
            "seen": [self.seen[c] for c in classes],
            "accepted": [self.accepted.get(c, 0) for c in classes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.seen = {int(c): int(n) for c, n in zip(state["class_ids"], state["seen"])}
        self.accepted = {int(c): int(n) for c, n in zip(state["class_ids"], state["accepted"])}

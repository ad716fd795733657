"""Thresholds of instance-level selection: one decision per scored candidate, per class.

Every threshold here has the interface `InstanceSelector` calls,

    decisions = threshold.decide_all(scores, class_ids, step=step)

(finite scores, one per candidate, with its class) and checkpoints through ``state_dict()`` /
``load_state_dict()`` (plain lists and numbers: loads with ``torch.load(weights_only=True)``).
The settings have no defaults here: they come from the run config (``selection`` section).

- `FixedInstanceThreshold`: accept when score ≥ a constant (``selection.fixed_threshold``).
- `PerClassPercentileThreshold`: keep about a fraction r of each class's candidates: the
  threshold is the (1 − r) quantile of the class's candidate scores of the last ``window_steps``
  steps (the step's own scores included).
- `CalibratedThreshold`: reject a candidate of class y when its score is below the α-quantile of
  the scores of *real* instances of y, scored the same way at nearly the same weights
  (conformal calibration): real instances are known good, so about a fraction α of good
  candidates is rejected whatever the generator's failure rate.

Windows count steps, not scores, because the scores drift as the detector learns (the class
cosines fall over a run): a window of the last N steps holds scores taken at nearly the current
weights, however many of them a class gets per step. A window of counts spans a different time
for each class and, for a rare one, most of the run.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selector.decision import Decision, threshold_decision

#: The pooled reference / window of all classes (`StepWindows`).
POOLED = -1


class StepWindows:
    """Scores per key (a class id, or `POOLED`), each with the step it was taken at; what is
    older than ``window_steps`` steps is dropped, but every key keeps at least its last
    ``keep_at_least`` scores whatever their age (0: none), and at most ``max_per_key``.

    Memory: 16 bytes per kept score; bounded by ``max_per_key`` per key.
    """

    def __init__(self, window_steps: int, *, keep_at_least: int = 0,
                 max_per_key: int = 4096) -> None:
        if int(window_steps) < 1:
            raise ValueError(f"window_steps={window_steps} must be at least 1 (steps)")
        if int(keep_at_least) < 0 or int(max_per_key) < max(1, int(keep_at_least)):
            raise ValueError(f"keep_at_least={keep_at_least} must be in [0, max_per_key="
                             f"{max_per_key}]")
        self.window_steps = int(window_steps)
        self.keep_at_least = int(keep_at_least)
        self.max_per_key = int(max_per_key)
        self.entries: dict[int, deque[tuple[int, float]]] = {}

    def add(self, key: int, scores: Sequence[float], step: int) -> None:
        """Append the finite ``scores`` taken at ``step`` under ``key``."""
        window = self.entries.setdefault(int(key), deque(maxlen=self.max_per_key))
        window.extend((int(step), float(s)) for s in scores if math.isfinite(float(s)))

    def prune(self, step: int) -> None:
        """Drop what is older than the window (steps ≤ step − window_steps)."""
        oldest = int(step) - self.window_steps
        for window in self.entries.values():
            while len(window) > self.keep_at_least and window[0][0] <= oldest:
                window.popleft()

    def values(self, key: int) -> np.ndarray:
        """The kept scores of ``key`` (float64, oldest first; empty when none)."""
        window = self.entries.get(int(key))
        return np.fromiter((s for _, s in window or ()), dtype=np.float64)

    def keys(self) -> list[int]:
        return sorted(k for k, w in self.entries.items() if w)

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.entries)
        return {"window_steps": self.window_steps, "keys": keys,
                "steps": [[t for t, _ in self.entries[k]] for k in keys],
                "scores": [[s for _, s in self.entries[k]] for k in keys]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.entries = {}
        for key, steps, scores in zip(state["keys"], state["steps"], state["scores"]):
            self.entries[int(key)] = deque(((int(t), float(s)) for t, s in zip(steps, scores)),
                                           maxlen=self.max_per_key)


def conformal_lower_bound(reference: np.ndarray, alpha: float) -> float:
    """The score below which a new sample exchangeable with ``reference`` falls with
    probability at most ``alpha``: the ⌊α(n + 1)⌋-th smallest of the n reference scores
    (−inf when that index is 0, i.e. fewer than 1/α − 1 scores: too few to reject anything
    with the guarantee)."""
    n = int(reference.size)
    k = math.floor(alpha * (n + 1))
    if k < 1:
        return -math.inf
    return float(np.partition(reference, k - 1)[k - 1])


class FixedInstanceThreshold:
    """Accept a candidate when its score ≥ ``threshold`` (the same for every class)."""

    name = "fixed_threshold"

    def __init__(self, threshold: float) -> None:
        if not math.isfinite(float(threshold)):
            raise ValueError(f"fixed_threshold={threshold} must be a finite number")
        self.threshold = float(threshold)

    def decide_all(self, scores: Sequence[float], class_ids: Sequence[int], *, step: int
                   ) -> list[Decision]:
        return [threshold_decision(float(s), self.threshold, step=step, policy=self.name)
                for s in scores]

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless: everything is configuration

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class PerClassPercentileThreshold:
    """Keep about a fraction r of each class's scores, from the first step on.

    A step's scores of a class join its window *before* the threshold is read, so the threshold
    is the (1 − r) quantile (linear interpolation) of the class's scores of the last
    ``window_steps`` steps, the step's own included: no initial constant, no window that must
    fill first. ``per_class=False`` pools all classes in one window.
    """

    name = "per_class_percentile"

    def __init__(self, keep_fraction: float, *, window_steps: int,
                 per_class: bool = True) -> None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]: the fraction of "
                             "candidates to accept")
        self.keep_fraction = float(keep_fraction)
        self.window = StepWindows(window_steps)
        self.per_class = bool(per_class)
        if not per_class:
            self.name = "percentile"

    def _key(self, class_id: int) -> int:
        return int(class_id) if self.per_class else POOLED

    def decide_all(self, scores: Sequence[float], class_ids: Sequence[int], *, step: int
                   ) -> list[Decision]:
        """Decisions for one step's finite ``scores`` (one per candidate, with its class)."""
        for score, class_id in zip(scores, class_ids):
            self.window.add(self._key(class_id), [score], step)
        self.window.prune(step)
        thresholds: dict[int, float] = {}
        out = []
        for score, class_id in zip(scores, class_ids):
            key = self._key(class_id)
            if key not in thresholds:
                thresholds[key] = float(np.quantile(self.window.values(key),
                                                    1.0 - self.keep_fraction))
            out.append(threshold_decision(float(score), thresholds[key], step=step,
                                          policy=self.name))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "percentile", "window": self.window.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "kind" not in state and "keys" in state:  # written before windows counted steps
            self.window.entries = {}
            for key, scores in zip(state["keys"], state["scores"]):
                self.window.add(int(key), scores, 0)
            return
        if state.get("kind") != "percentile":
            raise ValueError("the checkpoint's instance threshold is not the per-class "
                             "percentile (selection.threshold changed since it was written)")
        self.window.load_state_dict(state["window"])


class CalibratedThreshold:
    """Reject about a fraction α of good candidates, whatever the failure rate (module
    docstring).

    The reference of class y is the scores of real instances of y (`observe`), taken with the
    same score as the candidates, against the same cache, at the weights of their step. It
    keeps the scores of the last ``window_steps`` steps, and at least the last
    ``min_reference`` of each class however old (a rare class's real images come seldom). A
    class with fewer than ``min_reference`` real scores so far is judged against the pooled
    reference (the real scores of every class in the window). The threshold is the conformal
    lower bound of the reference (`conformal_lower_bound`); with no reference at all (the first
    step of a run) every candidate is accepted (threshold −inf): a candidate is not rejected
    without evidence.

    Args:
        alpha: the target fraction of good candidates rejected, in (0, 1).
        window_steps: the reference's window, in steps.
        min_reference: real scores a class needs for a reference of its own.
    """

    name = "calibrated"

    def __init__(self, alpha: float, *, window_steps: int, min_reference: int) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha={alpha} must be in (0, 1): the fraction of good candidates "
                             "the threshold may reject (e.g. 0.1)")
        if int(min_reference) < 1:
            raise ValueError(f"min_reference={min_reference} must be at least 1")
        self.alpha = float(alpha)
        self.min_reference = int(min_reference)
        self.classes = StepWindows(window_steps, keep_at_least=self.min_reference)
        self.pooled = StepWindows(window_steps)

    def observe(self, class_id: int, scores: Sequence[float], *, step: int) -> None:
        """Add real instances' scores of class ``class_id`` taken at ``step`` (non-finite ones
        are left out: a real instance whose score is NaN says nothing of good candidates)."""
        self.classes.add(class_id, scores, step)
        self.pooled.add(POOLED, scores, step)

    def reference(self, class_id: int) -> tuple[np.ndarray, str]:
        """The reference scores a candidate of ``class_id`` is judged against and which it is
        (``"class"`` or ``"pooled"``)."""
        own = self.classes.values(class_id)
        if own.size >= self.min_reference:
            return own, "class"
        return self.pooled.values(POOLED), "pooled"

    def threshold(self, class_id: int) -> float:
        return conformal_lower_bound(self.reference(class_id)[0], self.alpha)

    def decide_all(self, scores: Sequence[float], class_ids: Sequence[int], *, step: int
                   ) -> list[Decision]:
        self.classes.prune(step)
        self.pooled.prune(step)
        thresholds: dict[int, float] = {}
        out = []
        for score, class_id in zip(scores, class_ids):
            cid = int(class_id)
            if cid not in thresholds:
                thresholds[cid] = self.threshold(cid)
            out.append(threshold_decision(float(score), thresholds[cid], step=step,
                                          policy=self.name))
        return out

    def summary(self) -> dict[int, dict[str, float]]:
        """Per class with real scores: how many, their median and 5th percentile, the
        threshold and whether it is the class's own reference (1.0) or the pool's (0.0)."""
        out = {}
        for cid in self.classes.keys():
            values, which = self.reference(cid)
            own = self.classes.values(cid)
            out[cid] = {"reference_scores": float(own.size),
                        "reference_median": float(np.median(own)),
                        "reference_p05": float(np.quantile(own, 0.05)),
                        "threshold": conformal_lower_bound(values, self.alpha),
                        "own_reference": 1.0 if which == "class" else 0.0}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "calibrated", "alpha": self.alpha, "classes": self.classes.state_dict(),
                "pooled": self.pooled.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "calibrated":
            raise ValueError("the checkpoint's instance threshold is not the calibrated one "
                             "(selection.threshold changed since it was written)")
        self.classes.load_state_dict(state["classes"])
        self.pooled.load_state_dict(state["pooled"])


InstanceThreshold = FixedInstanceThreshold | PerClassPercentileThreshold | CalibratedThreshold

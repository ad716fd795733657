"""Closed-loop allocation: which classes and prompt templates to generate, from what the
trainer accepted.

:class:`DemandState` holds, per class and per (class, prompt option), how many candidates were
decided and how many accepted: totals (for targets and reports) and exponentially decayed
counts (for acceptance-rate estimates that can recover when a class starts to succeed). The
trainer feeds it every decision (:meth:`DemandState.record`); :func:`allocate` turns it into
the class weights and per-class prompt-option probabilities that the prompt sampler reads
(:meth:`generators.prompts.PromptSampler.set_weights` and ``set_option_weights``).

Policies (``FeedbackSettings.policy``), each multiplying the open-loop weights ``b_c``
(e.g. the rare boost):

- ``open_loop``: ``w_c = b_c`` (no feedback).
- ``yield_aware``: ``w_c = b_c * max(floor, y_c / max_k y_k)`` with ``y_c`` the class's
  smoothed acceptance rate: classes whose candidates keep being rejected get less generation,
  never less than ``floor`` of their open-loop share, so they are still tried and can recover.
- ``deficit``: ``w_c = b_c * max(floor, d_c / T_g)`` with ``d_c = max(T_g - accepted_c, 0)``
  the distance of the class's accepted count from its frequency group's target ``T_g``.

``stop_at_target`` (any policy): a class whose accepted count reached its group's target gets
weight 0 (the generation budget goes elsewhere) until every class is done, when the open-loop
weights apply again.

Prompt options (``template_policy``): ``uniform`` draws each class's options (its templates,
then its extra prompts) uniformly; ``bandit`` is a Boltzmann bandit over them: option ``t`` of
class ``c`` is drawn with probability ``(1 - eps) * softmax_t(r_ct / tau) + eps / T`` where
``r_ct`` is its acceptance rate shrunk towards the option's rate over all classes (which is
itself shrunk towards the overall rate), so a rare class with few decisions borrows what the
other classes learned about the template.

Everything here is plain numpy over counts; nothing reads the generator's truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("open_loop", "yield_aware", "deficit")
TEMPLATE_POLICIES = ("uniform", "bandit")
#: Pseudo-count of the shrinkage of acceptance rates (class towards overall, option towards
#: its all-class rate): with fewer decisions than this a rate stays near its prior.
PRIOR_COUNT = 10.0


@dataclass(frozen=True)
class FeedbackSettings:
    """How acceptance steers generation (the ``feedback`` config section).

    Attributes:
        policy: one of :data:`POLICIES`.
        template_policy: one of :data:`TEMPLATE_POLICIES`.
        targets: accepted instances wanted per class, by LVIS frequency group (``deficit``
            and ``stop_at_target``).
        stop_at_target: stop generating a class once its target is met.
        floor: the least share of its open-loop weight a class keeps (0 < floor <= 1).
        half_life: decisions of a class after which its old decisions count half in the
            acceptance-rate estimates.
        temperature, exploration: the bandit's ``tau`` and ``eps``.
    """

    policy: str = "open_loop"
    template_policy: str = "uniform"
    targets: Mapping[str, float] = field(default_factory=lambda: {"r": 100.0, "c": 60.0,
                                                                  "f": 30.0})
    stop_at_target: bool = False
    floor: float = 0.1
    half_life: float = 200.0
    temperature: float = 0.1
    exploration: float = 0.1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"feedback.policy: {self.policy!r} is not one of {POLICIES}")
        if self.template_policy not in TEMPLATE_POLICIES:
            raise ValueError(f"feedback.template_policy: {self.template_policy!r} is not one "
                             f"of {TEMPLATE_POLICIES}")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"feedback.floor: must be within (0, 1], got {self.floor}")
        if not self.half_life > 0:
            raise ValueError(f"feedback.half_life: must be > 0 decisions, got {self.half_life}")
        if not self.temperature > 0:
            raise ValueError(f"feedback.temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.exploration <= 1.0:
            raise ValueError(f"feedback.exploration: must be within [0, 1], got "
                             f"{self.exploration}")
        for group, target in self.targets.items():
            if group not in ("r", "c", "f"):
                raise ValueError(f"feedback.targets: {group!r} is not one of 'r', 'c', 'f'")
            if not isinstance(target, (int, float)) or isinstance(target, bool) \
                    or not target > 0:
                raise ValueError(f"feedback.targets.{group}: must be a number > 0, got "
                                 f"{target!r}")

    @property
    def closed(self) -> bool:
        """Whether the trainer's decisions change what is generated."""
        return (self.policy != "open_loop" or self.template_policy != "uniform"
                or self.stop_at_target)


class DemandState:
    """Decisions per class and per (class, prompt option), in vocabulary order.

    Args:
        class_ids: the vocabulary's class ids (``C`` of them).
        options: number of prompt options per class (``T``: the most any class has).
        half_life: see :class:`FeedbackSettings`.

    Arrays (float64): ``decided``/``accepted`` [C] totals; ``recent_decided``/
    ``recent_accepted`` [C] decayed; ``option_decided``/``option_accepted`` [C, T] decayed.
    ``decisions`` counts every recorded decision (the state's version).
    """

    def __init__(self, class_ids: Sequence[int], options: int, half_life: float = 200.0
                 ) -> None:
        self.class_ids = [int(c) for c in class_ids]
        self.index = {c: i for i, c in enumerate(self.class_ids)}
        self.options = max(1, int(options))
        self.half_life = float(half_life)
        c, t = len(self.class_ids), self.options
        self.decided = np.zeros(c)
        self.accepted = np.zeros(c)
        self.recent_decided = np.zeros(c)
        self.recent_accepted = np.zeros(c)
        self.option_decided = np.zeros((c, t))
        self.option_accepted = np.zeros((c, t))
        self.decisions = 0

    def record(self, class_ids: Sequence[int], options: Sequence[int],
               accepted: Sequence[bool]) -> int:
        """Add decisions (one per candidate; an invalid candidate counts as not accepted).

        ``options[i]`` is the prompt option the candidate was drawn with (-1: unknown, e.g. a
        pool entry: counted for its class only). Classes outside the vocabulary are ignored.
        Returns how many decisions were counted.
        """
        counted = 0
        cls = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        opt = np.asarray(options, dtype=np.int64).reshape(-1)
        acc = np.asarray(accepted, dtype=bool).reshape(-1)
        if not len(cls) == len(opt) == len(acc):
            raise ValueError(f"record: {len(cls)} classes, {len(opt)} options and {len(acc)} "
                             "decisions; give one of each per candidate")
        for i in sorted({self.index[c] for c in cls.tolist() if c in self.index}):
            mine = np.array([self.index.get(c, -1) == i for c in cls.tolist()])
            n, k = float(mine.sum()), float(acc[mine].sum())
            decay = 0.5 ** (n / self.half_life)
            self.decided[i] += n
            self.accepted[i] += k
            self.recent_decided[i] = self.recent_decided[i] * decay + n
            self.recent_accepted[i] = self.recent_accepted[i] * decay + k
            self.option_decided[i] *= decay
            self.option_accepted[i] *= decay
            for o, a in zip(opt[mine].tolist(), acc[mine].tolist()):
                if 0 <= o < self.options:
                    self.option_decided[i, o] += 1.0
                    self.option_accepted[i, o] += float(a)
            counted += int(n)
        self.decisions += counted
        return counted

    # -- estimates -------------------------------------------------------------------------

    def overall_rate(self) -> float:
        """Accepted / decided over every class (0.5 before any decision)."""
        n = self.recent_decided.sum()
        return float(self.recent_accepted.sum() / n) if n > 0 else 0.5

    def class_rates(self) -> np.ndarray:
        """Smoothed acceptance rate per class [C], shrunk towards the overall rate."""
        prior = self.overall_rate()
        return (self.recent_accepted + PRIOR_COUNT * prior) / (self.recent_decided + PRIOR_COUNT)

    def option_rates(self) -> np.ndarray:
        """Smoothed acceptance rate per (class, option) [C, T], shrunk towards the option's
        all-class rate (itself shrunk towards the overall rate)."""
        prior = self.overall_rate()
        by_option = (self.option_accepted.sum(0) + PRIOR_COUNT * prior) / (
            self.option_decided.sum(0) + PRIOR_COUNT)
        return (self.option_accepted + PRIOR_COUNT * by_option[None, :]) / (
            self.option_decided + PRIOR_COUNT)

    # -- checkpoints -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain data (JSON-safe) for a checkpoint."""
        return {"class_ids": self.class_ids, "options": self.options,
                "half_life": self.half_life, "decisions": self.decisions,
                **{k: getattr(self, k).tolist() for k in (
                    "decided", "accepted", "recent_decided", "recent_accepted",
                    "option_decided", "option_accepted")}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "DemandState":
        """The state :meth:`to_dict` wrote (ValueError when its shapes do not fit)."""
        state = cls(data["class_ids"], int(data["options"]), float(data["half_life"]))
        for key in ("decided", "accepted", "recent_decided", "recent_accepted",
                    "option_decided", "option_accepted"):
            value = np.asarray(data[key], dtype=np.float64)
            if value.shape != getattr(state, key).shape or not np.isfinite(value).all() \
                    or (value < 0).any():
                raise ValueError(f"feedback state: {key} has shape {value.shape} or values "
                                 "that do not fit this vocabulary")
            setattr(state, key, value)
        state.decisions = int(data["decisions"])
        return state


@dataclass(frozen=True)
class Allocation:
    """What the prompt sampler draws with: ``weights`` [C] (vocabulary order, not
    normalised), ``option_probs`` [C, T] (rows sum to 1 over each class's options) and
    ``stopped`` (class ids at their target). ``version`` is the decisions count it was made
    from."""

    weights: np.ndarray
    option_probs: np.ndarray
    stopped: tuple[int, ...]
    version: int


def allocate(state: DemandState, base: np.ndarray, frequency: Sequence[str],
             options_per_class: Sequence[int], settings: FeedbackSettings) -> Allocation:
    """The allocation of ``settings.policy`` for ``state``.

    Args:
        base: open-loop weight per class [C] (>= 0).
        frequency: LVIS frequency group per class (``"r"``, ``"c"``, ``"f"`` or ``""``).
        options_per_class: how many prompt options each class has (<= ``state.options``).
    """
    base = np.asarray(base, dtype=np.float64)
    targets = np.array([float(settings.targets.get(g, np.inf)) for g in frequency])
    weights = base.copy()
    if settings.policy == "yield_aware":
        rates = state.class_rates()
        best = rates[base > 0].max() if (base > 0).any() else 1.0
        weights = base * np.maximum(settings.floor, rates / max(best, 1e-12))
    elif settings.policy == "deficit":
        with np.errstate(invalid="ignore"):
            deficit = np.where(np.isfinite(targets),
                               np.maximum(targets - state.accepted, 0.0) / targets, 1.0)
        weights = base * np.maximum(settings.floor, deficit)
    stopped: tuple[int, ...] = ()
    if settings.stop_at_target:
        done = np.isfinite(targets) & (state.accepted >= targets) & (base > 0)
        if done.any() and not done[base > 0].all():
            weights = np.where(done, 0.0, weights)
            stopped = tuple(c for c, d in zip(state.class_ids, done) if d)
    probs = _option_probs(state, options_per_class, settings)
    return Allocation(weights, probs, stopped, state.decisions)


def _option_probs(state: DemandState, options_per_class: Sequence[int],
                  settings: FeedbackSettings) -> np.ndarray:
    counts = np.asarray(options_per_class, dtype=np.int64)
    valid = np.arange(state.options)[None, :] < counts[:, None]
    if settings.template_policy == "uniform":
        probs = valid.astype(np.float64)
    else:
        logits = np.where(valid, state.option_rates() / settings.temperature, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        soft = np.exp(logits)
        soft /= soft.sum(axis=1, keepdims=True)
        eps = settings.exploration
        probs = (1.0 - eps) * soft + eps * valid / np.maximum(counts[:, None], 1)
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-300)

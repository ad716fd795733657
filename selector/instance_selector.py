"""Instance-level selection: one decision per generated candidate (``granularity: instance``).

The batch selector decides once for all the candidates pasted into a step; a batch of 8 mixes
good and failed candidates, and its score cannot tell them apart (docs/algorithm.md, Instance
granularity). Here each candidate k of a step is judged on its own:

1. hard quality gates (`QualityGates`, e.g. ``mask_score >= 0.8``): a candidate below a gate is
   ``rejected_quality`` and gets no score (methods ``quality_gate`` and ``composite``);
2. a score: the BSGAL contribution cosine ⟨c_y, ∇ℓ_k⟩ / (‖c_y‖‖∇ℓ_k‖) of the candidate's own
   loss gradient with the real-data gradient cache of its class y (`ClassGradientCaches`;
   methods ``bsgal`` and ``composite``), or minus the detector's own loss on it (``loss``, and
   ``gated_loss`` behind the gates: the composite with the loss in place of the gradient);
3. a threshold per class (`selector.instance_thresholds`): the scale of the score differs by
   class; the calibrated threshold rejects a candidate whose score is below the α-quantile of
   real instances of its class (about α of good candidates rejected, whatever the failure
   rate), the percentile keeps a fraction r of each class's candidates, the fixed one is a
   constant.

``accept_all`` and ``random`` (each candidate with probability p) are the baselines at the
same granularity. The trainer computes the gradients and losses (trainer/instance_step.py);
this module only holds the caches and thresholds and decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from selector.decision import (
    ACCEPTED,
    INVALID_EMPTY_CACHE,
    INVALID_MISSING_FIELD,
    INVALID_NAN_FIELD,
    INVALID_NAN_SCORE,
    REJECTED_QUALITY,
    REJECTED_SCORE,
    Decision,
    invalid_decision,
)
from selector.flat_gradient import GradientLike
from selector.gradient_cache import GradientCache
from selector.instance_thresholds import (  # noqa: F401 (re-exported)
    CalibratedThreshold,
    FixedInstanceThreshold,
    InstanceThreshold,
    PerClassPercentileThreshold,
)
from selector.methods import SelectionMethod, selection_method
from selector.score import contribution_score


class QualityGates:
    """Hard minimums on candidate fields: ``{"mask_score": 0.8, "clip_score": 0.2}``.

    A field the gate names but the candidate lacks is ``invalid_missing_field`` (say so rather
    than let it through); a NaN value is ``invalid_nan_field``.
    """

    def __init__(self, minimums: Mapping[str, float]) -> None:
        self.minimums = {str(k): float(v) for k, v in minimums.items()}
        bad = {k: v for k, v in self.minimums.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"quality gate minimum(s) {bad} are not finite numbers")

    def check(self, fields: Mapping[str, Any]) -> str | None:
        """None when the candidate passes every gate, else the reason of its decision."""
        for name, minimum in self.minimums.items():
            if name not in fields:
                return INVALID_MISSING_FIELD
            value = float(fields[name])
            if not math.isfinite(value):
                return INVALID_NAN_FIELD
            if value < minimum:
                return REJECTED_QUALITY
        return None


class ClassGradientCaches:
    """One `GradientCache` per class, created when the class first gets a real gradient.

    Memory: one copy of the scored parameters per class seen, 4 bytes per number (float32) or 2
    (``dtype="bfloat16"``). Box head + predictor: 0.89 M numbers (3.5 MB float32) per class on
    the small CPU model; 20.1 M (80 MB float32, 40 MB bfloat16) on the ResNet-50 FPN model with
    LVIS's 1203 classes, i.e. 13 GB in bfloat16 for the 337 rare classes: bounded by the classes
    that actually get candidates, but large on LVIS (see docs/algorithm.md).
    """

    def __init__(self, params: Iterable[Tensor], *, mode: str = "average",
                 momentum: float = 0.1, dtype: torch.dtype | str = torch.float32) -> None:
        self.params = list(params)
        self.mode = mode
        self.momentum = float(momentum)
        self.dtype = dtype
        GradientCache(self.params[:1], mode=mode, momentum=momentum, dtype=dtype)  # validate
        self.caches: dict[int, GradientCache] = {}
        self.updated_at: dict[int, int] = {}

    def update(self, class_id: int, real_grad: GradientLike, *, step: int = 0) -> str | None:
        """Fold a real gradient of class ``class_id`` into its cache (None, or
        ``invalid_nan_real_grad`` when it was not finite and nothing changed)."""
        cache = self.caches.get(int(class_id))
        if cache is None:
            cache = GradientCache(self.params, mode=self.mode, momentum=self.momentum,
                                  dtype=self.dtype)
            reason = cache.update(real_grad)
            if reason is None:
                self.caches[int(class_id)] = cache
                self.updated_at[int(class_id)] = int(step)
            return reason
        reason = cache.update(real_grad)
        if reason is None:
            self.updated_at[int(class_id)] = int(step)
        return reason

    def get(self, class_id: int) -> GradientCache | None:
        return self.caches.get(int(class_id))

    def clear(self) -> None:
        """Forget every class's cache."""
        self.caches, self.updated_at = {}, {}

    def age(self, class_id: int, step: int) -> int | None:
        """Steps since the class's cache was last updated (None: it has none)."""
        last = self.updated_at.get(int(class_id))
        return None if last is None else int(step) - last

    def scores(self, class_id: int, grads: Any) -> tuple[Tensor, float] | None:
        """(K cosines, the cache's norm) of K candidate gradients (K x P) against the class's
        cache; None when it has none."""
        cache = self.caches.get(int(class_id))
        if cache is None:
            return None
        values = [contribution_score(cache, g, "cosine").value for g in grads]
        return torch.tensor(values, dtype=torch.float64), cache.norm()

    @property
    def nbytes(self) -> int:
        """Memory of the caches (bytes)."""
        return sum(c.nbytes() for c in self.caches.values())

    def state_dict(self) -> dict[str, Any]:
        classes = sorted(self.caches)
        return {"kind": "exact", "class_ids": classes,
                "caches": [self.caches[c].state_dict() for c in classes],
                "updated_at": [self.updated_at.get(c, 0) for c in classes]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind", "exact") != "exact":
            raise ValueError("the checkpoint holds sketched class caches; this run uses "
                             "selection.cache_sketch=none (they cannot be converted)")
        self.updated_at = {int(c): int(s) for c, s in zip(
            state["class_ids"], state.get("updated_at", [0] * len(state["class_ids"])))}
        self.caches = {}
        for class_id, cache_state in zip(state["class_ids"], state["caches"]):
            cache = GradientCache(self.params, mode=self.mode, momentum=self.momentum,
                                  dtype=self.dtype)
            cache.load_state_dict(cache_state)
            self.caches[int(class_id)] = cache


class InstanceSelector:
    """Decides on each generated candidate of a step (module docstring).

    What the method does comes from its description (`selector.methods`): whether its
    candidates pass the gates, which signal it scores with, how it decides.

    Args:
        method: an instance-level method of `selector.methods` (not ``none``).
        gates: the quality gates (gated methods; required there).
        threshold: the per-class threshold (methods that decide by threshold).
        caches: the class gradient caches (methods whose signal reads them).
        random_p, seed: acceptance probability and seed of ``random``.
    """

    def __init__(self, method: str, *, gates: QualityGates | None = None,
                 threshold: InstanceThreshold | None = None,
                 caches: ClassGradientCaches | None = None, random_p: float = 0.5,
                 seed: int = 0) -> None:
        spec = selection_method("instance", method)
        if not spec.trains_on_generated:
            raise ValueError(f"method {method!r} judges no candidate (real data only)")
        if spec.gated and gates is None:
            raise ValueError(f"method {method!r} needs quality gates (selection.quality_gates, "
                             "e.g. {mask_score: 0.8})")
        if spec.thresholded and threshold is None:
            raise ValueError(f"method {method!r} needs a threshold")
        if not 0.0 <= random_p <= 1.0:
            raise ValueError(f"random_p={random_p} must be in [0, 1]")
        self.spec: SelectionMethod = spec
        self.method = method
        self.gates = gates
        self.threshold = threshold
        self.caches = caches
        self.random_p = float(random_p)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def signal(self) -> str | None:
        """The name of the per-candidate score the trainer computes (None: no score)."""
        return self.spec.signal

    @property
    def calibrates(self) -> bool:
        """The threshold wants the scores of real instances (`observe_reference`)."""
        return isinstance(self.threshold, CalibratedThreshold)

    def observe_reference(self, class_id: int, scores: Sequence[float], *, step: int) -> None:
        """Real instances' scores of ``class_id`` for the calibrated threshold's reference."""
        if isinstance(self.threshold, CalibratedThreshold):
            self.threshold.observe(class_id, scores, step=step)

    @property
    def policy_name(self) -> str:
        if self.threshold is not None:
            return self.threshold.name
        return self.method

    def gate(self, fields: Mapping[str, Any]) -> str | None:
        """The gate's reason for a candidate, or None when it passes (or the method has none)."""
        if not self.spec.gated:
            return None
        assert self.gates is not None
        return self.gates.check(fields)

    def contribution(self, class_id: int, grad: GradientLike) -> tuple[float | None, float | None]:
        """(cosine score, cache norm) of one candidate gradient against its class's exact
        cache; (None, None) when the class has no cache yet."""
        values, norm = self.contributions(class_id, [grad])
        return (None, None) if values is None else (values[0], norm)

    def contributions(self, class_id: int, candidates: Any
                      ) -> tuple[list[float] | None, float | None]:
        """The cosines of the candidates of one class against its cache, and the cache's norm:
        ``candidates`` are their K gradients (exact caches, K x P) or their boxes' layer factors
        (sketched caches, `selector.class_sketch.LayerFactors` of K rows); (None, None) when
        the class has no cache yet."""
        if self.caches is None:
            raise ValueError(f"method {self.method!r} was built without class gradient caches")
        result = self.caches.scores(class_id, candidates)
        if result is None:
            return None, None
        values, norm = result
        return [float(v) for v in values], float(norm)

    def decide(self, *, step: int, class_ids: Sequence[int],
               fields: Sequence[Mapping[str, Any]],
               scores: Sequence[float | None] | None = None,
               cache_norms: Sequence[float | None] | None = None) -> list[Decision]:
        """One decision per candidate.

        Args:
            class_ids, fields: per candidate.
            scores: per candidate, the contribution cosine or minus its loss (methods that
                score); None where no cache existed, NaN where the score was not finite.
            cache_norms: per candidate, the norm of the cache it was scored against.
        """
        n = len(class_ids)
        scores = list(scores) if scores is not None else [None] * n
        norms = list(cache_norms) if cache_norms is not None else [None] * n
        decisions: list[Decision | None] = [None] * n
        decide = self.spec.decision
        to_judge = []
        for k in range(n):
            reason = self.gate(fields[k])
            if reason == REJECTED_QUALITY:
                decisions[k] = Decision(False, REJECTED_QUALITY, step, policy="quality_gate")
            elif reason is not None:
                decisions[k] = invalid_decision(reason, step=step, policy="quality_gate")
            elif decide != "threshold":
                to_judge.append(k)
            elif scores[k] is None:
                decisions[k] = invalid_decision(INVALID_EMPTY_CACHE, step=step,
                                                policy=self.policy_name)
            elif not math.isfinite(float(scores[k])):  # type: ignore[arg-type]
                decisions[k] = invalid_decision(INVALID_NAN_SCORE, step=step,
                                                policy=self.policy_name, cache_norm=norms[k])
            else:
                to_judge.append(k)
        if decide == "accept":
            for k in to_judge:
                decisions[k] = Decision(True, ACCEPTED, step, policy=self.policy_name)
        elif decide == "random":
            draws = torch.rand((len(to_judge),), generator=self.generator,
                               dtype=torch.float64).tolist()
            for k, u in zip(to_judge, draws):
                decisions[k] = Decision(u < self.random_p, ACCEPTED if u < self.random_p
                                        else REJECTED_SCORE, step, policy=self.policy_name)
        elif to_judge:
            assert self.threshold is not None
            judged = self.threshold.decide_all([float(scores[k]) for k in to_judge],
                                               [class_ids[k] for k in to_judge], step=step)
            for k, d in zip(to_judge, judged):
                decisions[k] = d.with_cache_norm(norms[k])
        return [d for d in decisions if d is not None]

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats, strings and lists: loads with ``weights_only=True``."""
        return {
            "method": self.method,
            "generator_state": self.generator.get_state(),
            "threshold": None if self.threshold is None else self.threshold.state_dict(),
            "caches": None if self.caches is None else self.caches.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"checkpointed instance selector used method {state['method']!r}; "
                             f"this run uses {self.method!r}")
        self.generator.set_state(state["generator_state"])
        if self.threshold is not None:
            self.threshold.load_state_dict(state["threshold"])
        if self.caches is not None:
            self.caches.load_state_dict(state["caches"])

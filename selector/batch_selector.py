"""`BatchSelector`: gradient cache + contribution score + policy → one `Decision` per batch.

Faithful BSGAL step (docs/algorithm.md, Faithful mode), one decision per worker batch::

    flat = FlatGradient(params)                       # one reusable (numel,) buffer
    selector.update_cache(flat.compute(real_cls_loss), step=step)   # 1. real "test" batch
    decision = selector.decide(step=step, num_generated=n,          # 2.-3. pasted batch
                               candidate_grad=flat.compute(generated_loss),
                               class_ids=class_ids)  # of the pasted instances
    # 4. train on the pasted batch if decision.accepted, else on the real images without pastes

Efficient variant (both loss parts from one graph): ``flat.compute(real_part, retain_graph=True)``
for the cache, then ``flat.compute(generated_part, retain_graph=True)`` for the score, then the
training backward on the same graph. Per-parameter gradients (``parameter_gradients``) work
everywhere a flat one does and avoid the buffer: the selector's memory is then the cache alone
(4 bytes/parameter in fp32, 2 in bf16); `FlatGradient` adds 4 bytes/parameter but is a little
faster (see benchmarks/selector_overhead.py).

Order of checks in `decide`: empty batch → non-finite real gradient at this step → (gradient
methods) empty cache → non-finite candidate gradient → non-finite score → the policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from selector.decision import (
    INVALID_EMPTY_BATCH,
    INVALID_EMPTY_CACHE,
    INVALID_NAN_CANDIDATE_GRAD,
    INVALID_NAN_SCORE,
    Decision,
    invalid_decision,
)
from selector.flat_gradient import GradientLike
from selector.gradient_cache import GradientCache
from selector.score import SCORE_KINDS, contribution_score
from selector.thresholds import SelectionPolicy

#: The method name of the exact look-ahead baseline (see `BatchSelector.uses_lookahead`).
LOOKAHEAD = "lookahead"


def _storages(grad: GradientLike) -> set[int]:
    tensors = [grad] if isinstance(grad, Tensor) else [g for g in grad if g is not None]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


def _share_memory(a: GradientLike, b: GradientLike) -> bool:
    """Whether two gradients (flat or per parameter) overlap in memory."""
    return bool(_storages(a) & _storages(b))


class BatchSelector:
    """Decides, batch by batch, whether generated candidates are trained on.

    Args:
        policy: the threshold or baseline policy (`selector.thresholds`, `selector.baselines`).
        cache: the gradient cache for BSGAL scoring; None for methods that score without
            gradients (accept-all, random, field threshold, look-ahead gain handed in as
            ``score``).
        score_kind: ``"cosine"`` (reference) or ``"dot"``; used only with a cache.
        method: the method name recorded for the run (``"bsgal"``, ``"random"``, ...);
            ``"lookahead"`` makes it the exact look-ahead baseline (`uses_lookahead`).
    """

    def __init__(self, policy: SelectionPolicy, *, cache: GradientCache | None = None,
                 score_kind: str = "cosine", method: str = "bsgal") -> None:
        if score_kind not in SCORE_KINDS:
            raise ValueError(f"score kind {score_kind!r} is unknown; use one of {SCORE_KINDS}")
        self.policy = policy
        self.cache = cache
        self.score_kind = score_kind
        self.method = method
        self._real_grad_failure: tuple[int, str] | None = None  # (step, reason) of a bad update

    @property
    def needs_gradients(self) -> bool:
        """True when `update_cache` and ``candidate_grad`` are expected (BSGAL scoring)."""
        return self.cache is not None

    @property
    def uses_lookahead(self) -> bool:
        """True for the exact look-ahead baseline (``method="lookahead"``): the caller computes
        `selector.lookahead.exact_lookahead_gain` against a real "test" batch and hands it to
        `decide` as ``score``."""
        return self.method == LOOKAHEAD

    def update_cache(self, real_grad: GradientLike, *, step: int) -> str | None:
        """Fold this step's real-data gradient into the cache.

        Returns None, or ``"invalid_nan_real_grad"`` when the gradient was not finite: the cache
        is left untouched and the decision for this ``step`` becomes that invalid reason.
        """
        if self.cache is None:
            raise ValueError(f"method {self.method!r} has no gradient cache; do not pass real "
                             "gradients (check selector.needs_gradients)")
        reason = self.cache.update(real_grad)
        if reason is not None:
            self._real_grad_failure = (step, reason)
        return reason

    def decide(self, *, step: int, num_generated: int, candidate_grad: GradientLike | None = None,
               score: float | None = None, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        """Decide one batch.

        Args:
            step: training iteration (also selects a real-gradient failure of the same step).
            num_generated: number of generated instances in the batch; 0 → ``invalid_empty_batch``.
            candidate_grad: gradient of the generated part of the loss (gradient methods only).
            score: a score computed elsewhere, e.g. ``exact_lookahead_gain(...).gain``
                (methods without a cache).
            class_ids: classes of the batch's generated instances (for per-class policies).
            fields: candidate fields (for `FieldThreshold`), name → value or per-candidate values.
        """
        cache_norm = None if self.cache is None else self.cache.norm()

        def invalid(reason: str) -> Decision:
            return invalid_decision(reason, step=step, policy=self.policy.name,
                                    cache_norm=cache_norm)

        if num_generated <= 0:
            return invalid(INVALID_EMPTY_BATCH)
        if self._real_grad_failure is not None and self._real_grad_failure[0] == step:
            return invalid(self._real_grad_failure[1])
        if self.cache is not None:
            if candidate_grad is None:
                raise ValueError("BSGAL scoring needs candidate_grad (the gradient of the loss on "
                                 "the generated instances)")
            if score is not None:
                raise ValueError("pass either candidate_grad (BSGAL) or score, not both")
            if self.cache.num_updates == 0:
                return invalid(INVALID_EMPTY_CACHE)
            scored = contribution_score(self.cache, candidate_grad, self.score_kind)
            if not math.isfinite(scored.candidate_norm):
                return invalid(INVALID_NAN_CANDIDATE_GRAD)
            score = scored.value
        elif candidate_grad is not None:
            raise ValueError(f"method {self.method!r} has no gradient cache to score "
                             "candidate_grad against")
        if score is not None and not math.isfinite(score):
            return invalid(INVALID_NAN_SCORE)
        decision = self.policy.decide(score, step=step, class_ids=class_ids, fields=fields)
        return decision.with_cache_norm(cache_norm)

    def select(self, *, step: int, num_generated: int, real_grad: GradientLike | None = None,
               candidate_grad: GradientLike | None = None, score: float | None = None,
               class_ids: Sequence[int] = (), fields: Mapping[str, Any] | None = None) -> Decision:
        """`update_cache` (when ``real_grad`` is given) followed by `decide`.

        Raises:
            ValueError: ``real_grad`` and ``candidate_grad`` share memory, e.g. both came from
                one `FlatGradient` (its ``compute`` returns the same reusable buffer each time,
                so the first gradient was overwritten by the second and the cache would be fed
                the candidate's own gradient). Call ``update_cache(flat.compute(real_loss))``
                before computing the candidate gradient, or use two `FlatGradient` objects.
        """
        if real_grad is not None and candidate_grad is not None and _share_memory(
                real_grad, candidate_grad):
            raise ValueError(
                "real_grad and candidate_grad are the same memory (one FlatGradient buffer "
                "returned twice?): the real gradient was overwritten by the candidate's. Call "
                "selector.update_cache(flat.compute(real_loss), step=...) first, then "
                "selector.decide(candidate_grad=flat.compute(generated_loss), ...), or use a "
                "FlatGradient per gradient")
        if real_grad is not None:
            self.update_cache(real_grad, step=step)
        return self.decide(step=step, num_generated=num_generated, candidate_grad=candidate_grad,
                           score=score, class_ids=class_ids, fields=fields)

    def state_dict(self) -> dict[str, Any]:
        """Cache and policy state (tensors/ints/floats/strings/lists/dicts only)."""
        return {
            "method": self.method,
            "score_kind": self.score_kind,
            "policy_name": self.policy.name,
            "policy": self.policy.state_dict(),
            "cache": None if self.cache is None else self.cache.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method or state["policy_name"] != self.policy.name:
            raise ValueError(f"checkpointed selector is method={state['method']!r} with policy "
                             f"{state['policy_name']!r}; this run is method={self.method!r} with "
                             f"policy {self.policy.name!r}")
        if (state["cache"] is None) != (self.cache is None):
            raise ValueError("checkpointed selector and this run disagree on having a gradient "
                             "cache")
        self.policy.load_state_dict(state["policy"])
        if self.cache is not None:
            self.cache.load_state_dict(state["cache"])

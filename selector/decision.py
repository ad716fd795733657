"""The decision record and the one vocabulary of decision reasons.

Every batch of generated candidates that reaches the trainer gets exactly one `Decision`; the
trainer copies it onto every candidate of the batch, so these strings end up in the ``reason``
column of the project's Parquet decision rows and in the ``bsgal inspect`` report.

Reasons
-------
``accepted``
    The policy accepted the batch: the trainer trains on the pasted batch.
``rejected_score``
    The score was below the threshold (or the random draw / field value said no): the trainer
    trains on the same real images without the pasted instances.
``invalid_<why>``
    The batch could not be judged. It is treated like a rejection (``accepted`` is False), nothing
    of it enters the gradient cache or the dynamic-threshold window, and the row says why:

    - ``invalid_empty_batch``: the batch has no generated instance. (The reference scores such a
      batch 0 and accepts it; we do not pretend to have judged it.)
    - ``invalid_nan_real_grad``: the real-data gradient of this step was not finite (NaN, ±Inf,
      or so large that its norm overflows). The gradient cache was left untouched.
    - ``invalid_nan_candidate_grad``: the gradient of the generated part was not finite.
    - ``invalid_empty_cache``: no real-data gradient has been cached yet, so there is nothing to
      compare against.
    - ``invalid_nan_score``: a score handed in from outside (for example the exact look-ahead
      loss change) was NaN or infinite.
    - ``invalid_missing_field``: a field-threshold baseline found no value for its field.
    - ``invalid_nan_field``: the field value was NaN or infinite.
    - ``invalid_not_visible`` (instance granularity): the candidate was pasted but nothing of it
      survived (covered by later pastes, or too small once resized): nothing to judge.

``rejected_quality`` (instance granularity)
    A hard quality gate (e.g. ``mask_score`` below its minimum) rejected the candidate before
    any score was computed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ACCEPTED = "accepted"
REJECTED_SCORE = "rejected_score"
INVALID_EMPTY_BATCH = "invalid_empty_batch"
INVALID_NAN_REAL_GRAD = "invalid_nan_real_grad"
INVALID_NAN_CANDIDATE_GRAD = "invalid_nan_candidate_grad"
INVALID_EMPTY_CACHE = "invalid_empty_cache"
INVALID_NAN_SCORE = "invalid_nan_score"
INVALID_MISSING_FIELD = "invalid_missing_field"
INVALID_NAN_FIELD = "invalid_nan_field"
INVALID_NOT_VISIBLE = "invalid_not_visible"
REJECTED_QUALITY = "rejected_quality"

#: The reasons for a batch that could not be judged.
INVALID_REASONS: tuple[str, ...] = (
    INVALID_EMPTY_BATCH,
    INVALID_NAN_REAL_GRAD,
    INVALID_NAN_CANDIDATE_GRAD,
    INVALID_EMPTY_CACHE,
    INVALID_NAN_SCORE,
    INVALID_MISSING_FIELD,
    INVALID_NAN_FIELD,
    INVALID_NOT_VISIBLE,
)
REASONS: tuple[str, ...] = (ACCEPTED, REJECTED_SCORE, REJECTED_QUALITY, *INVALID_REASONS)


def is_invalid(reason: str) -> bool:
    """True for the selector's ``invalid_*`` reasons (`INVALID_REASONS`: the batch could not be
    judged). Decision rows, whose reasons also come from the stages and the trainer, are
    classified by ``generators.columns.reason_kind``."""
    return reason in INVALID_REASONS


@dataclass(frozen=True)
class Decision:
    """What the selector decided about one batch of generated candidates.

    Attributes:
        accepted: train on the pasted batch (True) or on the real images without pastes (False).
            Always False for ``invalid_*`` reasons.
        reason: one of `REASONS` (see the module docstring).
        step: the training iteration the batch was scored at.
        score: the value the threshold was applied to: cosine in [-1, 1] or dot product for
            BSGAL, the real-loss decrease for the exact look-ahead, the field value for a field
            threshold. None when nothing was scored (invalid input, accept-all, random).
        threshold: the threshold in force for this batch (same units as ``score``); None for
            policies without one.
        cache_norm: L2 norm of the gradient cache when the batch was scored (None without a
            cache). A cache norm near zero makes cosine scores meaningless; it is kept for audit.
        policy: the rule that made the decision, e.g. ``"fixed_threshold"``,
            ``"dynamic_percentile"``, ``"rare_class_min_accept_rate"``, ``"random"``.
    """

    accepted: bool
    reason: str
    step: int
    score: float | None = None
    threshold: float | None = None
    cache_norm: float | None = None
    policy: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown decision reason {self.reason!r}; expected one of {REASONS}")
        if self.accepted != (self.reason == ACCEPTED):
            raise ValueError(
                f"inconsistent decision: accepted={self.accepted} with reason {self.reason!r}"
            )

    @property
    def invalid(self) -> bool:
        return is_invalid(self.reason)

    def with_cache_norm(self, cache_norm: float | None) -> Decision:
        return dataclasses.replace(self, cache_norm=cache_norm)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (bool/str/int/float/None) for a decision row."""
        return dataclasses.asdict(self)


def invalid_decision(reason: str, *, step: int, policy: str = "",
                     cache_norm: float | None = None) -> Decision:
    """A not-accepted decision for a batch that could not be judged."""
    if not is_invalid(reason):
        raise ValueError(f"{reason!r} is not an invalid_* reason")
    return Decision(accepted=False, reason=reason, step=step, policy=policy,
                    cache_norm=cache_norm)


def threshold_decision(score: float, threshold: float, *, step: int, policy: str) -> Decision:
    """Accept when ``score >= threshold`` (the reference's comparison, ties accepted)."""
    if not (math.isfinite(score)):
        return invalid_decision(INVALID_NAN_SCORE, step=step, policy=policy)
    accepted = score >= threshold
    return Decision(accepted=accepted, reason=ACCEPTED if accepted else REJECTED_SCORE,
                    step=step, score=float(score), threshold=float(threshold), policy=policy)

"""Baseline policies behind the same interface as the thresholds (`SelectionPolicy`).

- `AcceptAll`: keep every batch (plain copy-paste training, X-Paste style).
- `RandomAcceptance`: keep a batch with probability p, from its own checkpointed generator.
- `FieldThreshold`: keep a batch when a candidate field (e.g. ``clip_score``, ``mask_score``)
  reaches a threshold; one value per batch (mean or min over its candidates).

The exact look-ahead baseline is `selector.lookahead.exact_lookahead_gain` (it needs the model)
followed by ``FixedThreshold(0.0, name="lookahead")`` on its gain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from selector.decision import (
    ACCEPTED,
    INVALID_MISSING_FIELD,
    INVALID_NAN_FIELD,
    REJECTED_SCORE,
    Decision,
    invalid_decision,
    threshold_decision,
)


class AcceptAll:
    """Accept every batch. A score, if given, is recorded but not used."""

    name = "accept_all"

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        return Decision(accepted=True, reason=ACCEPTED, step=step,
                        score=None if score is None else float(score), policy=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RandomAcceptance:
    """Accept each batch independently with probability ``p``.

    Draws come from a private ``torch.Generator`` seeded with ``seed``; its state is part of
    ``state_dict``, so a resumed run makes the same draws as an uninterrupted one.
    """

    name = "random"

    def __init__(self, p: float = 0.5, *, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random acceptance probability p={p} must be in [0, 1]")
        self.p = float(p)
        self.generator = torch.Generator().manual_seed(int(seed))

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        draw = float(torch.rand((), generator=self.generator))
        accepted = draw < self.p
        return Decision(accepted=accepted, reason=ACCEPTED if accepted else REJECTED_SCORE,
                        step=step, score=None if score is None else float(score),
                        policy=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator_state"])


class FieldThreshold:
    """Accept when a candidate field reaches ``threshold``: score = reduce(field over the batch).

    Args:
        field: key in ``fields`` (e.g. ``"clip_score"``, ``"mask_score"``); its value is a number
            or one number per candidate.
        threshold: accept when the reduced value ≥ threshold.
        reduce: ``"mean"`` (default) or ``"min"`` (every candidate must pass).
    """

    name = "field_threshold"

    def __init__(self, field: str, threshold: float, *, reduce: str = "mean") -> None:
        if not field:
            raise ValueError("field_threshold needs a field name, e.g. field='clip_score'")
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce={reduce!r} is unknown; use 'mean' or 'min'")
        self.field = field
        self.threshold = float(threshold)
        self.reduce = reduce

    def decide(self, score: float | None, *, step: int, class_ids: Sequence[int] = (),
               fields: Mapping[str, Any] | None = None) -> Decision:
        raw = None if fields is None else fields.get(self.field)
        if raw is None:
            return invalid_decision(INVALID_MISSING_FIELD, step=step, policy=self.name)
        values = torch.as_tensor(raw, dtype=torch.float64).reshape(-1)
        if values.numel() == 0:
            return invalid_decision(INVALID_MISSING_FIELD, step=step, policy=self.name)
        value = float(values.mean() if self.reduce == "mean" else values.min())
        if not math.isfinite(value):
            return invalid_decision(INVALID_NAN_FIELD, step=step, policy=self.name)
        return threshold_decision(value, self.threshold, step=step, policy=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

"""Window summaries of a trainer worker: what happened over the last ``log_every`` steps.

One :class:`WindowStats` per worker collects decisions, time blocked on the candidate stream,
time spent training and the stages' per-row busy seconds (the ``_seconds_<stage>`` columns of
:mod:`pipeline.run.graph`); :meth:`WindowStats.close` returns the window's record for
``metrics.jsonl`` and starts the next window. Counts that run over the whole job live in
:class:`RunCounters` (they are checkpointed).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from generators.columns import reason_kind
from pipeline.storage.row_names import STAGES, timing_column

SCORE_QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class RunCounters:
    """Whole-run counts of one worker (plain numbers; part of its checkpoint).

    Attributes:
        accepted/rejected/invalid: candidates by decision (:attr:`decided` is their sum).
        candidate_steps: optimizer steps on pasted candidates.
        warmup_steps: real-only steps before candidates were consumed.
        filler_steps: real-only steps because no candidate was there (late, gone, or to keep
            DDP ranks in step).
        extra_steps: candidate steps taken after ``training.steps`` (LR at its final value).
        wait_seconds: time blocked on the candidate stream; busy_seconds: time in steps.
    """

    accepted: int = 0
    rejected: int = 0
    invalid: int = 0
    candidate_steps: int = 0
    warmup_steps: int = 0
    filler_steps: int = 0
    extra_steps: int = 0
    wait_seconds: float = 0.0
    busy_seconds: float = 0.0

    @property
    def decided(self) -> int:
        return self.accepted + self.rejected + self.invalid

    def count(self, decision: str) -> None:
        """One more candidate with ``decision`` (``accepted``, ``rejected`` or ``invalid``)."""
        setattr(self, decision, getattr(self, decision) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decided": self.decided}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunCounters":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class WindowStats:
    """Accumulates one window; see the module docstring."""

    stage_pools: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_step: int = 0
    scores: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "rejected": 0,
                                                                "invalid": 0})
    arrived: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wait_seconds: float = 0.0
    busy_seconds: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def add_batch(self, batch: dict[str, np.ndarray], waited: float) -> None:
        """A candidate batch arrived after blocking ``waited`` seconds."""
        n = len(batch["sample_id"])
        self.arrived += n
        self.wait_seconds += waited
        for stage in STAGES:
            col = batch.get(timing_column(stage))
            if col is not None:
                self.stage_seconds[stage] += float(np.sum(col, dtype=np.float64))

    def add_wait(self, waited: float) -> None:
        self.wait_seconds += waited

    def add_decision(self, row: dict[str, Any]) -> None:
        kind = reason_kind(str(row["reason"]))
        self.decisions[kind] += 1
        score = row.get("score")
        if kind != "invalid" and score is not None and math.isfinite(score):
            self.scores.append(float(score))
        threshold = row.get("threshold")
        if threshold is not None and math.isfinite(threshold):
            self.thresholds.append(float(threshold))

    def add_step(self, kind: str, seconds: float, loss: float) -> None:
        self.steps[kind] = self.steps.get(kind, 0) + 1
        self.busy_seconds += seconds
        if math.isfinite(loss):
            self.losses.append(loss)

    def close(self, step: int) -> dict[str, Any]:
        """The window's record (rates in candidates per second) and a reset."""
        wall = max(time.monotonic() - self.started, 1e-9)
        scored = self.decisions["accepted"] + self.decisions["rejected"]
        record: dict[str, Any] = {
            "first_step": self.first_step,
            "last_step": step - 1,
            "seconds": wall,
            "steps": dict(self.steps),
            "loss_mean": float(np.mean(self.losses)) if self.losses else None,
            "decisions": dict(self.decisions),
            "acceptance_rate": self.decisions["accepted"] / scored if scored else None,
            "score_quantiles": ({f"q{int(q * 100)}": float(np.quantile(self.scores, q))
                                 for q in SCORE_QUANTILES} if self.scores else None),
            "threshold_last": self.thresholds[-1] if self.thresholds else None,
            "wait_seconds": self.wait_seconds,
            "wait_fraction": self.wait_seconds / max(self.wait_seconds + self.busy_seconds,
                                                     1e-9),
            "candidates_per_second": self.arrived / wall,
            "stages": {
                stage: {
                    "busy_seconds": secs,
                    # One actor's rate while busy, and the pool's (x its size).
                    "per_actor_per_second": self.arrived / secs if secs > 0 else None,
                    "pool_per_second": (self.arrived / secs * self.stage_pools.get(stage, 1)
                                        if secs > 0 else None),
                }
                for stage, secs in self.stage_seconds.items()
            },
        }
        fresh = WindowStats(stage_pools=self.stage_pools, first_step=step)
        self.__dict__.update(fresh.__dict__)
        return record

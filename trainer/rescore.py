"""Judging stored candidates at one fixed detector state, without training (``bsgal rescore``).

A `DetectorTrainer` restored from a checkpoint scores candidate batches with its instance-level
step's own ``score`` (`trainer.instance_step.InstanceStep.score`: paste onto real images, the
quality gates, the method's signal: the contribution cosine of each candidate's own loss
gradient with its class's real-gradient cache, or minus its loss), but takes no optimizer step,
and puts the model's buffers (BatchNorm running statistics) back after every batch: every batch
is judged at exactly the checkpoint's weights.

"Without training" leaves one question, where the real-gradient cache comes from
(``cache``):

- ``real`` (default): per class, the real loss gradient at the checkpoint's weights, from
  ``real_images`` training images holding that class (drawn with a seed from the run seed and
  the class id), computed once when the class is first met and then held. The weights do not
  move, so this is the quantity the first-order estimate asks for, ⟨∇L_real(θ), ∇ℓ_k(θ)⟩,
  and a candidate's score does not depend on which batch or worker scored it;
- ``checkpoint``: the caches saved in the checkpoint, held fixed: the run's running average
  of real gradients taken at earlier weights, i.e. what the run would have scored the next
  candidate against. A class that had no cache yet gives ``invalid_empty_cache``.

The paste context of a batch (which real images, where) is drawn from generators seeded with
the run seed and the batch's first stream offset, so the same batch is pasted the same way
whichever worker scores it.

The threshold (the per-class percentile over a window of recent scores, or the calibrated
threshold's reference of real-instance scores) is a sequential state; `decide` applies it on
one process, in stream order, starting from the checkpoint's windows, as the run would have
(the calibrated reference is the checkpoint's: a re-score pastes no real instances of its own). Scoring (`Rescorer.score`) is stateless between batches and
runs wherever there are workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from selector.decision import INVALID_EMPTY_CACHE
from selector.instance_selector import InstanceSelector
from trainer.candidates import (
    batch_rows,
    check_candidate,
    cut_out,
    decision_record,
    numeric_fields,
)
from trainer.instance_step import InstanceStep
from trainer.loop import DetectorTrainer, derive_seed
from trainer.step import PastedBatch

CACHE_MODES = ("real", "checkpoint")
#: The per-candidate result of `Rescorer.score`: a reason decided before the threshold (an
#: ``invalid_*`` reason) or ``""`` (to be decided by `decide`), the score (NaN when none) and
#: the norm of the cache it was scored against (NaN when none).
PRE_REASON, SCORE, CACHE_NORM = "pre_reason", "score", "cache_norm"


class Rescorer:
    """Scores candidate batches at a trainer's current (restored) state (module docstring).

    Args:
        trainer: an instance-granularity `DetectorTrainer`, its state loaded.
        cache: ``real`` or ``checkpoint`` (module docstring).
        real_images: real images per class for ``cache="real"``.
        seed: the run seed (paste contexts and the real images per class).
    """

    def __init__(self, trainer: DetectorTrainer, *, cache: str = "real", real_images: int = 8,
                 seed: int = 0) -> None:
        if not isinstance(trainer.step_fn, InstanceStep) or \
                not isinstance(trainer.selector, InstanceSelector):
            raise ValueError("rescoring judges candidates one by one: the checkpoint's run must "
                             "use selection.granularity=instance")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache {cache!r} is not one of {CACHE_MODES}")
        if real_images < 1:
            raise ValueError(f"real_images={real_images} must be at least 1")
        self.trainer = trainer
        self.selector: InstanceSelector = trainer.selector
        self.step: InstanceStep = trainer.step_fn
        self.cache = cache
        self.real_images = int(real_images)
        self.seed = int(seed)
        self.poisoned: set[int] = set()
        self._cached: set[int] = set()
        if cache == "real" and self.selector.caches is not None:
            self.selector.caches.clear()
        module = trainer.backend.module
        module.train()  # the losses are defined in train mode, as in the run
        self._buffers = {k: v.detach().clone() for k, v in module.named_buffers()}

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for name, value in self.trainer.backend.module.named_buffers():
                value.copy_(self._buffers[name])

    def _reseed(self, first_offset: int) -> None:
        t = self.trainer
        t.sampler.load_state_dict({"seed": derive_seed(self.seed, first_offset, 11),
                                   "epoch": 0, "offset": 0})
        t.paster.rng = np.random.default_rng(derive_seed(self.seed, first_offset, 12))

    def real_indices(self, class_id: int) -> list[int]:
        """The training images whose real gradient makes class ``class_id``'s cache."""
        holding = [i for i, ids in enumerate(self.trainer.real.category_ids_per_image)
                   if class_id in ids]
        if len(holding) <= self.real_images:
            return holding
        rng = np.random.default_rng(derive_seed(self.seed, class_id, 13))
        return sorted(int(i) for i in rng.choice(holding, self.real_images, replace=False))

    def _ensure_caches(self, labels: Mapping[int, int], inputs: Any = None) -> set[int]:
        """The classes' caches (``cache="real"``: computed when a class is first met; with
        ``checkpoint`` the checkpoint's, held fixed); returns the poisoned classes so far."""
        if self.step.sketched:  # the checkpoint's input bases (fitted if it has none)
            self.step.ensure_basis(self.trainer.step, refresh=False)
        if self.cache == "real":
            for class_id, label in sorted(labels.items()):
                if class_id in self._cached:
                    continue
                self._cached.add(class_id)
                indices = self.real_indices(class_id)
                if indices:
                    self.poisoned |= self.step.update_caches(
                        [self.trainer.real[i] for i in indices], {class_id: label},
                        step=self.trainer.step)
        return self.poisoned

    def score(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
              first_offset: int) -> list[dict[str, Any]]:
        """One result per row of ``batch`` (``pre_reason``, ``score``, ``cache_norm``), in
        input order; ``first_offset`` is the stream offset of the batch's first row."""
        rows = batch_rows(batch)
        out = [{PRE_REASON: "", SCORE: math.nan, CACHE_NORM: math.nan} for _ in rows]
        t = self.trainer
        waiting = []
        for position, row in enumerate(rows):
            reason = check_candidate(row, t.label_of, t.min_mask_pixels)
            if reason is None:
                waiting.append(cut_out(position, row, t.label_of[int(row["class_id"])]))
            else:
                out[position][PRE_REASON] = reason
        self._reseed(first_offset)
        try:
            while waiting:
                self._score_pasted(t.paste_next(waiting, real_test=False), out)
        finally:
            self._restore_buffers()
        return out

    def _score_pasted(self, batch: PastedBatch, out: list[dict[str, Any]]) -> None:
        for position, scored in self.step.score(batch.pasted, batch.candidates,
                                                self._ensure_caches).items():
            if scored.reason:
                out[position][PRE_REASON] = scored.reason
            elif scored.score is None:
                out[position][PRE_REASON] = INVALID_EMPTY_CACHE
            else:
                out[position][SCORE] = float(scored.score)
                if scored.cache_norm is not None:
                    out[position][CACHE_NORM] = float(scored.cache_norm)


def decide(selector: InstanceSelector, rows: Sequence[Mapping[str, Any]],
           scored: Sequence[Mapping[str, Any]], *, step: int, first_offset: int,
           batch_id: str, method: str) -> list[dict[str, Any]]:
    """The decision rows (`trainer.candidates.decision_record`, rank 0) of one scored batch.

    Rows with a ``pre_reason`` keep it; the others go through ``selector.decide`` (quality
    gates, then the threshold, whose windows this call moves on: call it in stream order).
    """
    records: list[dict[str, Any] | None] = [None] * len(rows)
    pending = []
    for i, (row, s) in enumerate(zip(rows, scored)):
        if s[PRE_REASON]:
            records[i] = decision_record(str(row["sample_id"]), reason=str(s[PRE_REASON]),
                                         accepted=False, step=step, rank=0, method=method,
                                         stream_offset=first_offset + i, batch_id=batch_id,
                                         cache_norm=_finite(s[CACHE_NORM]))
        else:
            pending.append(i)
    judged = selector.decide(step=step, class_ids=[int(rows[i]["class_id"]) for i in pending],
                             fields=[numeric_fields(rows[i]) for i in pending],
                             scores=[float(scored[i][SCORE]) for i in pending],
                             cache_norms=[_finite(scored[i][CACHE_NORM]) for i in pending])
    for i, d in zip(pending, judged):
        records[i] = decision_record(str(rows[i]["sample_id"]), reason=d.reason,
                                     accepted=d.accepted, step=step, rank=0, method=method,
                                     stream_offset=first_offset + i, batch_id=batch_id,
                                     score=d.score, threshold=d.threshold,
                                     cache_norm=d.cache_norm)
    return [r for r in records if r is not None]


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None

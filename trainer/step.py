"""The one interface of a training step with generated candidates: score, decide, train.

A step object (`trainer.bsgal_step.BsgalStep`, one decision per pasted batch;
`trainer.instance_step.InstanceStep`, one per candidate) turns a `PastedBatch` into a
`StepResult`: a `Verdict` for every pasted candidate, and the gradients of the loss it trained
on left in ``param.grad`` (the loop clips them and steps the optimizer). Both share the real-only
step and the one stock-loss backward of `TrainingStep`. `trainer.loop.DetectorTrainer` calls
``run`` without asking which kind of step it holds; `trainer.rescore.Rescorer` calls the
instance step's ``score`` alone (no training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.backends.base import DetectorBackend
from trainer.candidates import Candidate
from trainer.copy_paste import PastedImage
from trainer.real_data import original_inputs, pasted_inputs, real_inputs

TRAINED_ON_PASTED = "pasted"
TRAINED_ON_ORIGINAL = "original"
#: Batch positions of the real instances pasted for calibration (`PastedBatch.calibration`):
#: above any candidate batch's positions, so that they are "generated" instances of the pasted
#: images (scored as candidates are) and never meet a candidate's position.
CALIBRATION_POSITIONS = 1 << 30


class NonFiniteLossError(FloatingPointError):
    """A training loss term is NaN or infinite; the message names the step and the term."""

    def __init__(self, step: int, term: str, value: float, batch: str) -> None:
        self.step, self.term, self.value = step, term, value
        super().__init__(
            f"step {step}: training loss term '{term}' is {value} on the {batch} batch; the "
            "model or the data diverged (lower training.lr, raise warmup, check the images), "
            "training stops here instead of applying a poisoned update")


def check_finite(losses: Mapping[str, Tensor], step: int, batch: str) -> None:
    """Raise `NonFiniteLossError` for the first non-finite term."""
    for term, value in losses.items():
        v = float(value.detach())
        if not math.isfinite(v):
            raise NonFiniteLossError(step, term, v, batch)


@dataclass
class PastedBatch:
    """One step's input: pasted images, the candidates on them, and the real "test" batch.

    Attributes:
        pasted: the pasted images (each keeps its original).
        candidates: the candidates pasted in this step.
        class_ids: their category ids.
        real_test: real samples containing those classes (when the step scores against real
            gradients drawn for it), or None.
        fields: numeric candidate fields by name, one value per candidate.
        calibration: real instances pasted beside the candidates (positions from
            `CALIBRATION_POSITIONS`), scored as candidates are for the calibrated threshold's
            reference; never decided on, never trained on.
    """

    pasted: list[PastedImage]
    candidates: list[Candidate]
    class_ids: list[int]
    real_test: list[dict[str, Any]] | None
    fields: dict[str, list[float]]
    calibration: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """One candidate's decision fields (a decision row's ``accepted``, ``reason``, ``score``,
    ``threshold``, ``cache_norm``; None where nothing was computed)."""

    accepted: bool
    reason: str
    score: float | None = None
    threshold: float | None = None
    cache_norm: float | None = None

    @classmethod
    def of(cls, decision: Any) -> "Verdict":
        """From a `selector.Decision`."""
        return cls(bool(decision.accepted), str(decision.reason), decision.score,
                   decision.threshold, decision.cache_norm)


@dataclass
class StepResult:
    """What one step decided and trained on.

    Attributes:
        decisions: candidate position → its `Verdict` (every pasted candidate).
        trained_on: ``"pasted"`` (the accepted candidates, re-rendered at instance level) or
            ``"original"`` (the real images without pastes).
        losses: the trained loss terms (floats).
        num_generated: visible generated instances before the decision.
        score_seconds: wall time of the scoring and the decisions (instance level; at batch
            level the scoring passes are counted as training).
        verdict: the batch's one verdict (batch level), else None.
        log: the step kind's own fields for the step log (``metrics.jsonl``).
    """

    decisions: dict[int, Verdict]
    trained_on: str
    losses: dict[str, float] = field(default_factory=dict)
    num_generated: int = 0
    score_seconds: float = 0.0
    verdict: Verdict | None = None
    log: dict[str, Any] = field(default_factory=dict)

    @property
    def num_accepted(self) -> int:
        return sum(v.accepted for v in self.decisions.values())


class TrainingStep:
    """What every step kind shares: the real-only step and the stock-loss backward.

    Subclasses implement ``run(step, batch, *, rerender, lookahead_lr) -> StepResult`` and
    say whether they need the real "test" batch (`needs_real_test`).
    """

    #: Real instances to paste per step for a calibrated threshold's reference (0: none).
    calibration_pastes = 0

    def __init__(self, backend: DetectorBackend) -> None:
        self.backend = backend

    @property
    def needs_real_test(self) -> bool:
        """Whether `trainer.loop.DetectorTrainer.paste_next` must draw a real "test" batch."""
        return False

    def real_test_for(self, step: int, class_ids: Sequence[int], covered: set[int]
                      ) -> tuple[list[int], int] | None:
        """The real "test" images the step wants for candidates of ``class_ids`` (``covered``:
        the classes the step's own images hold): ``(classes to draw images of, how many)``, or
        None for none."""
        return None

    def train_real(self, samples: Sequence[dict[str, Any]], step: int) -> dict[str, float]:
        """Backward of the stock loss on real samples (gradients into ``param.grad``)."""
        return self.backward_stock(*real_inputs(samples, self.backend.device), step, "real")

    def backward_stock(self, images: list[Tensor], targets: list[dict[str, Any]], step: int,
                       batch: str) -> dict[str, float]:
        """The stock detector loss on ``images``/``targets`` and its backward (through the
        DDP wrapper where there is one); NonFiniteLossError names a non-finite term."""
        split = self.backend.losses(images, targets)
        check_finite(split.stock, step, batch)
        torch.stack(list(split.stock.values())).sum().backward()
        return {k: float(v.detach()) for k, v in split.stock.items()}

    def train_on(self, step: int, pasted: Sequence[PastedImage],
                 trained: Sequence[PastedImage] | None) -> tuple[str, dict[str, float]]:
        """The stock loss on ``trained`` (pasted images holding what was accepted) or, when
        None (nothing accepted), on the originals of ``pasted``, pixel for pixel; returns
        (trained_on, losses)."""
        device = self.backend.device
        if trained is not None:
            return TRAINED_ON_PASTED, self.backward_stock(*pasted_inputs(trained, device), step,
                                                          "pasted")
        return TRAINED_ON_ORIGINAL, self.backward_stock(*original_inputs(pasted, device), step,
                                                        "original")

    def run(self, step: int, batch: PastedBatch, *,
            rerender: Callable[[PastedImage, set[int]], PastedImage],
            lookahead_lr: float | None = None) -> StepResult:
        raise ValueError("no selector (method 'none'): train on real images only with "
                         "train_real(); generated candidates cannot be judged")

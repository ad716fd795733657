"""The training loop: real batches, pasted candidates, BSGAL decisions, evaluation, checkpoints.

`DetectorTrainer` is a plain object, usable from a script or from a Ray Train worker (it imports
no Ray). A worker feeds it candidate batches as they arrive::

    trainer = DetectorTrainer(backend, train_set, selector=selector, val_set=val_set, ...)
    for batch in shard.iter_batches(batch_size=8, batch_format="numpy"):
        result = trainer.train_on_candidates(batch)   # one or more steps
        write(result.decisions)                       # exactly one row per candidate
    state = trainer.state_dict()                      # model, optimizer, scheduler, EMA, cache,
                                                      # threshold state, RNG states, offset

Real-only steps (warmup, or no candidate at hand) are ``train_real_step()``. The run's loop
and its checkpoint files (``state_dict`` split by rank) are `pipeline.run.train_worker` and
`pipeline.storage.checkpoints`.

Per step: ``batch_size`` real images from the repeat-factor sampler; candidates chosen
class-balanced, 0..``max_pastes_per_image`` per image (`trainer.copy_paste`); the step object
chosen once from the selector (`trainer.step`: `trainer.instance_step.InstanceStep`, a
decision per candidate, or `trainer.bsgal_step.BsgalStep`, one per pasted batch) decides and
leaves the gradients; then gradient clipping, the optimizer, the
warmup+cosine schedule and the optional EMA. A candidate batch is used up within the call, so a
checkpoint taken between calls holds no half-used batch and ``stream_offset`` (candidates
consumed) says where to resume the stream. Where steps must be taken one at a time (DDP ranks
have to take the same number of steps), ``pool = take_candidates(batch)`` then
``step_candidates(pool)`` until ``pool.done`` does the same work one optimizer step per call.

Determinism: with the same seeds, inputs and thread count, two runs make the same decisions;
the trainer seeds torch's global generator (used by torchvision's RoI/anchor samplers) from
``seed`` and ``rank`` when it is built, and a checkpoint restores it together with numpy's and
Python's global generators and the trainer's own generators.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from selector import BatchSelector
from selector.instance_selector import InstanceSelector
from trainer.backends.base import DetectorBackend, image_tensor
from trainer.bsgal_step import BsgalStep
from trainer.candidates import (
    Candidate,
    batch_rows,
    check_candidate,
    cut_out,
    decision_record,
)
from trainer.copy_paste import ClassSizeStatistics, CopyPaste
from trainer.datasets.lvis_format import LvisDataset
from trainer.defaults import SELECTION_DEFAULTS as _S
from trainer.defaults import TRAINING_DEFAULTS as _T
from trainer.evaluation import LvisEvaluator
from trainer.instance_step import InstanceStep
from trainer.optim import ModelEma, build_optimizer, build_scheduler
from trainer.real_data import RealImages
from trainer.sampling import ClassAwareSampler, RepeatFactorSampler
from trainer.step import (
    CALIBRATION_POSITIONS,
    NonFiniteLossError,
    PastedBatch,
    StepResult,
    TrainingStep,
)

CHECKPOINT_FORMAT = "bsgal-trainer/1"


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for one purpose (``keys``) derived from the run seed."""
    return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0])


@dataclass
class CandidatePool:
    """One candidate batch being used up step by step (`DetectorTrainer.take_candidates`).

    Attributes:
        records: one decision row per incoming row, in input order (None until decided).
        waiting: checked candidates not pasted yet.
        first_offset: stream offset of the batch's first row.
        seconds: per incoming row, its share of its step's wall time spent (scoring, the rest
            of the step: pasting, training, the optimizer); (0, 0) for rows decided before
            pasting. Kept apart from the decisions, which are deterministic.
    """

    records: list[dict[str, Any] | None]
    waiting: list[Candidate]
    first_offset: int
    seconds: list[tuple[float, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether every candidate of the batch has its decision."""
        return not self.waiting

    def decisions(self) -> list[dict[str, Any]]:
        """The batch's decision rows, one per incoming row (the pool must be ``done``)."""
        if not self.done or any(r is None for r in self.records):
            raise RuntimeError("the candidate pool still has undecided candidates")
        return list(self.records)  # type: ignore[arg-type]


@dataclass
class CandidateBatchResult:
    """What `DetectorTrainer.train_on_candidates` did with one candidate batch.

    Attributes:
        decisions: one decision row per incoming candidate, in input order (docs/contracts.md,
            Decision: fields plus ``sample_id`` and ``stream_offset``).
        steps: one log dict per optimizer step taken (step, decision, losses, lr, grad norm,
            seconds, and ``metrics`` when an evaluation ran after it).
    """

    decisions: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)


class DetectorTrainer:
    """Trains a detector on real images and judged generated candidates.

    Args:
        backend: the detector (`trainer.backends.base.DetectorBackend`), on its device.
        train_set: the real training split.
        selector: `selector.BatchSelector` (one decision per step's batch: BSGAL or a
            baseline), or `selector.instance_selector.InstanceSelector` (one decision per
            candidate, `trainer.instance_step`); None trains on real data only.
        mode: BSGAL mode, ``"faithful"`` (the only one left).
        score_parameters: instance level: ``"heads"`` or ``"all"`` (`trainer.instance_step`).
        batch_size: real images per step (each may receive pastes).
        real_batch_size: images of the real "test" batch (faithful BSGAL; reference 4).
        real_gradients, topup_images, cache_max_age, basis_images, basis_refresh_steps:
            instance level: where the class caches' real gradients come from and the sketched
            caches' input bases (`trainer.instance_step.InstanceStep`).
        max_pastes_per_image: candidates pasted per image are drawn in 0..this.
        optimizer, lr, weight_decay, momentum: AdamW (reference) or SGD settings.
        warmup_steps, total_steps, schedule: linear warmup, then cosine over ``total_steps``.
        grad_clip: max global gradient norm (0 disables).
        ema: EMA decay of the weights (0 disables); evaluation uses the EMA weights.
        repeat_factor_threshold: LVIS repeat-factor threshold t (0.001).
        val_set, eval_every, max_eval_images: periodic LVIS evaluation (0 disables).
        seed, rank: run seed and Ray Train worker rank (different ranks draw different images).
        image_cache_size: decoded real images kept in memory (LRU; the built-in set fits whole,
            an LVIS sample with its masks takes a few MB).
        min_mask_pixels: candidates with smaller masks are ``invalid_empty_mask``.

    The defaults of the settings named like config keys are the run config's
    (`trainer.defaults`).
    """

    def __init__(self, backend: DetectorBackend, train_set: LvisDataset, *,
                 selector: BatchSelector | InstanceSelector | None = None,
                 mode: str = _S["mode"], score_parameters: str = _S["score_parameters"],
                 batch_size: int = _T["batch_size"],
                 real_batch_size: int = _S["real_batch_size"],
                 max_pastes_per_image: int = _T["max_pastes_per_image"],
                 optimizer: str = _T["optimizer"], lr: float = _T["lr"],
                 weight_decay: float = _T["weight_decay"], momentum: float = _T["momentum"],
                 warmup_steps: int = _T["warmup_steps"], total_steps: int = _T["steps"],
                 schedule: str = _T["schedule"], grad_clip: float = _T["grad_clip"],
                 ema: float = _T["ema"],
                 repeat_factor_threshold: float = _T["repeat_factor_threshold"],
                 val_set: LvisDataset | None = None, eval_every: int = _T["eval_every"],
                 max_eval_images: int | None = None, seed: int = 0, rank: int = 0,
                 real_gradients: str = _S["real_gradients"],
                 topup_images: int = _S["topup_images"],
                 cache_max_age: int = _S["cache_max_age"],
                 basis_images: int = _S["basis_images"],
                 basis_refresh_steps: int = _S["basis_refresh_steps"],
                 calibration_pastes: int = _S["calibration_pastes"],
                 image_cache_size: int = 256, min_mask_pixels: int = 16) -> None:
        if batch_size < 1 or real_batch_size < 1:
            raise ValueError(f"batch_size={batch_size} and real_batch_size={real_batch_size} "
                             "must be >= 1")
        self.backend = backend
        self.train_set = train_set
        self.val_set = val_set
        if val_set is not None:
            _check_same_categories(train_set, val_set)
        self.selector = selector
        self.method = "none" if selector is None else selector.method
        self.granularity = "instance" if isinstance(selector, InstanceSelector) else "batch"
        self.mode = mode
        self.batch_size = int(batch_size)
        self.real_batch_size = int(real_batch_size)
        self.grad_clip = float(grad_clip)
        self.eval_every = int(eval_every)
        self.max_eval_images = max_eval_images
        self.rank = int(rank)
        self.min_mask_pixels = int(min_mask_pixels)
        self.real = RealImages(train_set, image_cache_size)
        self.label_of = {c.id: c.label for c in train_set.categories}
        self.category_of = {c.label: c.id for c in train_set.categories}
        self.seed = int(seed)
        # The one place where the step kind is chosen; everything after calls its interface.
        self.step_fn: TrainingStep
        if isinstance(selector, InstanceSelector):
            self.step_fn = InstanceStep(
                backend, selector, score_parameters, class_of_label=self.category_of,
                real_gradients=real_gradients, real_batch_size=real_batch_size,
                topup_images=topup_images, cache_max_age=cache_max_age,
                basis_source=self._basis_samples, basis_images=basis_images,
                basis_refresh_steps=basis_refresh_steps, calibration_pastes=calibration_pastes)
        elif selector is not None:
            self.step_fn = BsgalStep(backend, selector, mode, real_batch_size)
        else:
            BsgalStep.check_mode(mode)
            self.step_fn = TrainingStep(backend)
        self.sampler = RepeatFactorSampler(self.real.category_ids_per_image,
                                           repeat_factor_threshold, derive_seed(seed, rank, 1))
        self.test_sampler = ClassAwareSampler(self.real.category_ids_per_image,
                                              derive_seed(seed, rank, 2))
        self.paster = CopyPaste(ClassSizeStatistics.from_dataset(train_set),
                                max_per_image=max_pastes_per_image, seed=derive_seed(seed, rank, 3))
        self.optimizer = build_optimizer(backend.trainable_parameters(), optimizer, lr,
                                         weight_decay, momentum)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps, total_steps, schedule)
        self.ema = ModelEma(backend.module, ema) if ema > 0 else None
        self.step = 0
        self.stream_offset = 0
        self.metrics_log: list[dict[str, Any]] = []
        torch.manual_seed(derive_seed(seed, rank, 4))
        backend.module.train()

    # -- steps ------------------------------------------------------------------------------

    def _optimizer_step(self, compute: Any) -> tuple[Any, float]:
        """zero grads → ``compute()`` (leaves gradients) → clip → step → schedule → EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        result = compute()
        params = self.backend.trainable_parameters()
        if self.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
        if not math.isfinite(norm):
            raise NonFiniteLossError(self.step, "gradient norm", norm, "training")
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.backend.module)
        self.step += 1
        return result, norm

    def _log(self, started: float, grad_norm: float, losses: Mapping[str, float],
             **extra: Any) -> dict[str, Any]:
        entry = {"step": self.step - 1, "lr": self.optimizer.param_groups[0]["lr"],
                 "loss": float(sum(losses.values())), "losses": dict(losses),
                 "grad_norm": grad_norm, "seconds": time.perf_counter() - started, **extra}
        if self.eval_every and self.val_set is not None and self.step % self.eval_every == 0:
            entry["metrics"] = self.evaluate()
            self.metrics_log.append({"step": self.step, **entry["metrics"]})
        return entry

    def train_real_step(self) -> dict[str, Any]:
        """One plain step on ``batch_size`` real images (no candidates); returns its log."""
        started = time.perf_counter()
        samples = [self.real[i] for i in self.sampler.next_indices(self.batch_size)]
        step = self.step
        losses, norm = self._optimizer_step(lambda: self.step_fn.train_real(samples, step))
        return self._log(started, norm, losses, kind="real")

    def train_on_candidates(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]
                            ) -> CandidateBatchResult:
        """Check, paste, judge and train on one candidate batch (one or more steps).

        Invalid candidates get their ``invalid_*`` row at once; the rest are used up in steps of
        ``batch_size`` real images each. Returns exactly one decision row per candidate.
        Equivalent to `take_candidates` followed by `step_candidates` until the pool is done.
        """
        pool = self.take_candidates(batch)
        logs = []
        while not pool.done:
            logs.append(self.step_candidates(pool))
        return CandidateBatchResult(decisions=pool.decisions(), steps=logs)

    def take_candidates(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]
                        ) -> CandidatePool:
        """Check a candidate batch and hold its valid candidates for `step_candidates`.

        Invalid candidates get their decision rows at once. ``stream_offset`` advances by the
        batch's length now, so a checkpoint must wait until the pool is ``done``. Use this (one
        optimizer step per call of `step_candidates`) where steps must be counted one by one,
        e.g. DDP ranks that have to take the same number of steps.
        """
        if self.selector is None:
            raise ValueError("this trainer has no selector (method 'none'); it trains on real "
                             "data only: call train_real_step()")
        rows = batch_rows(batch)
        pool = CandidatePool(records=[None] * len(rows), waiting=[],
                             first_offset=self.stream_offset,
                             seconds=[(0.0, 0.0)] * len(rows))
        for position, row in enumerate(rows):
            reason = check_candidate(row, self.label_of, self.min_mask_pixels)
            if reason is None:
                pool.waiting.append(cut_out(position, row, self.label_of[int(row["class_id"])]))
            else:
                pool.records[position] = decision_record(
                    str(row["sample_id"]), reason=reason, accepted=False, step=self.step,
                    rank=self.rank, method=self.method,
                    stream_offset=pool.first_offset + position, cache_norm=self._cache_norm())
        self.stream_offset += len(rows)
        return pool

    def step_candidates(self, pool: CandidatePool) -> dict[str, Any]:
        """One optimizer step that pastes candidates taken out of ``pool`` (which must not be
        ``done``); their decision rows are filled in. Returns the step's log."""
        if pool.done:
            raise ValueError("the candidate pool is used up; take the next batch first")
        started = time.perf_counter()
        batch = self.paste_next(pool.waiting)
        outcome, log = self.train_pasted(batch)
        log["seconds"] = time.perf_counter() - started  # pasting included
        # Each pasted candidate's share of the step: scoring (instance level; at batch level
        # the scoring gradients are the training backward's split, so all of it is training)
        # and the rest (pasting, training, the optimizer).
        n = max(1, len(batch.candidates))
        scoring = outcome.score_seconds
        share = (scoring / n, max(0.0, log["seconds"] - scoring) / n)
        log["score_seconds"] = scoring
        for c in batch.candidates:
            pool.seconds[c.position] = share
            v = outcome.decisions[c.position]
            pool.records[c.position] = decision_record(
                c.sample_id, reason=v.reason, accepted=v.accepted, step=log["step"],
                rank=self.rank, method=self.method,
                stream_offset=pool.first_offset + c.position, batch_id=log["batch_id"],
                score=v.score, threshold=v.threshold, cache_norm=v.cache_norm)
        return log

    def _basis_samples(self, count: int, index: int) -> list[dict[str, Any]]:
        """``count`` training images for the ``index``-th fit of the sketched caches' input
        bases: drawn from the run seed alone, so every rank fits the same bases."""
        rng = np.random.default_rng(derive_seed(self.seed, index, 21))
        picked = rng.choice(len(self.real), size=min(count, len(self.real)), replace=False)
        return [self.real[int(i)] for i in sorted(picked)]

    def _cache_norm(self) -> float | None:
        """The batch selector's cache norm (recorded on rows decided before pasting)."""
        cache = getattr(self.selector, "cache", None)
        return None if cache is None else cache.norm()

    def paste_next(self, pool: list[Candidate], real_test: bool = True) -> PastedBatch:
        """Take candidates out of ``pool`` and paste them onto the next ``batch_size`` real
        images; also draw the real "test" batch when the step needs one (and ``real_test``:
        `trainer.rescore` brings its own real gradients)."""
        samples = [self.real[i] for i in self.sampler.next_indices(self.batch_size)]
        per_image = self.paster.assign(pool, len(samples))
        used = [c for chosen in per_image for c in chosen]
        class_ids = [c.class_id for c in used]
        calibration = []
        if real_test and used and self.step_fn.calibration_pastes > 0:
            calibration = self.calibration_pieces(class_ids, self.step_fn.calibration_pastes)
            for piece in calibration:  # beneath the candidates: they never hide one
                per_image[int(self.paster.rng.integers(0, len(samples)))].insert(0, piece)
        pasted = [self.paster.paste(s, c) for s, c in zip(samples, per_image)]
        test: list[dict[str, Any]] | None = None
        request = self.step_fn.real_test_for(self.step, class_ids, {
            self.category_of[int(label)] for p in pasted
            for label, source in zip(p.labels.tolist(), p.source_positions.tolist())
            if source < 0}) if real_test else None
        if request is not None and request[1] > 0:
            test = [self.real[i] for i in self.test_sampler.sample(*request)]
        names = sorted(set.intersection(*(set(c.fields) for c in used))) if used else []
        fields = {name: [c.fields[name] for c in used] for name in names}
        return PastedBatch(pasted, used, class_ids, test, fields, calibration)

    def calibration_pieces(self, class_ids: Sequence[int], count: int) -> list[Candidate]:
        """``count`` real instances of the step's candidate classes, cut out of real training
        images (drawn as the real "test" images are, one class after another), to be pasted
        and scored as candidates for the calibrated threshold's reference; positions from
        `CALIBRATION_POSITIONS` on. They are never trained on: the training pass re-renders
        the images with accepted candidates only."""
        wanted = list(dict.fromkeys(int(c) for c in class_ids))
        pieces = []
        for k, index in enumerate(self.test_sampler.sample(wanted, count)):
            sample = self.real[index]
            labels = [int(x) for x in sample["labels"]]
            mine = [j for j, label in enumerate(labels)
                    if self.category_of.get(label) == wanted[k % len(wanted)]
                    and int(np.asarray(sample["masks"][j]).sum()) >= self.min_mask_pixels]
            if not mine:
                continue
            j = mine[int(self.paster.rng.integers(0, len(mine)))]
            cid = self.category_of[labels[j]]
            pieces.append(cut_out(CALIBRATION_POSITIONS + k, {
                "sample_id": f"real-{sample.get('image_id', index)}-{j}", "class_id": cid,
                "image": sample["image"], "mask": sample["masks"][j]}, self.label_of[cid]))
        return pieces

    def train_pasted(self, batch: PastedBatch) -> tuple[StepResult, dict[str, Any]]:
        """One optimizer step on a pasted batch (decisions included); returns the step's
        `trainer.step.StepResult` and its log."""
        started = time.perf_counter()
        step = self.step
        lr = self.optimizer.param_groups[0]["lr"]
        result, norm = self._optimizer_step(lambda: self.step_fn.run(
            step, batch, rerender=self.paster.rerender, lookahead_lr=lr))
        log = self._log(started, norm, result.losses, kind="candidates",
                        batch_id=f"rank{self.rank}-step{step}", **result.log,
                        trained_on=result.trained_on, num_candidates=len(batch.candidates),
                        num_generated=result.num_generated)
        return result, log

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, dataset: LvisDataset | None = None, max_images: int | None = None
                 ) -> dict[str, dict[str, float]]:
        """LVIS AP/APr/APc/APf (bbox, segm) on ``dataset`` (default: the validation split)
        with the official evaluator; uses the EMA weights when EMA is on."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            raise ValueError("no dataset to evaluate on: pass one or build the trainer with "
                             "val_set")
        _check_same_categories(self.train_set, dataset)
        limit = max_images if max_images is not None else self.max_eval_images
        count = len(dataset) if limit is None else min(limit, len(dataset))
        ids = [dataset.images[i]["id"] for i in range(count)]
        evaluator = LvisEvaluator(dataset.subset(ids), self.category_of)
        module = self.backend.module
        context = self.ema.applied(module) if self.ema is not None else contextlib.nullcontext()
        skipped = []
        with context:
            for start in range(0, count, self.batch_size):
                samples = []
                for i in range(start, min(start + self.batch_size, count)):
                    sample = dataset.load_or_skip(i)  # None: bad_images=skip left it out
                    if sample is None:
                        skipped.append(ids[i])
                    else:
                        samples.append(sample)
                if not samples:
                    continue
                images = [image_tensor(s["image"], self.backend.device) for s in samples]
                for sample, det in zip(samples, self.backend.predict(images)):
                    evaluator.process(sample["image_id"], det["boxes"].cpu().numpy(),
                                      det["scores"].cpu().numpy(), det["labels"].cpu().numpy(),
                                      det["masks"].cpu().numpy())
        if skipped:
            evaluator.gt = dataset.subset(set(ids) - set(skipped))
        return evaluator.evaluate()

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (plain data and tensors only; it loads
        with ``torch.load(weights_only=True)``)."""
        np_state = np.random.get_state()
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "stream_offset": self.stream_offset,
            "method": self.method,
            "mode": self.mode,
            "model": self.backend.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "sampler": self.sampler.state_dict(),
            "test_sampler": self.test_sampler.state_dict(),
            "copy_paste": self.paster.state_dict(),
            "metrics_log": list(self.metrics_log),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], [int(x) for x in np_state[1]], *np_state[2:]],
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict` of a trainer of the same method, mode and EMA setting."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r} is not "
                             f"{CHECKPOINT_FORMAT!r}; it was not written by this trainer")
        if state["method"] != self.method or state["mode"] != self.mode:
            raise ValueError(f"checkpoint was method={state['method']!r} mode={state['mode']!r};"
                             f" this run is method={self.method!r} mode={self.mode!r}")
        self.backend.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("checkpoint and this run disagree on EMA (training.ema)")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.selector is not None:
            self.selector.load_state_dict(state["selector"])
        self.sampler.load_state_dict(state["sampler"])
        self.test_sampler.load_state_dict(state["test_sampler"])
        self.paster.load_state_dict(state["copy_paste"])
        self.step = int(state["step"])
        self.stream_offset = int(state["stream_offset"])
        self.metrics_log = list(state["metrics_log"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        random.setstate(_as_tuple(rng["python"]))


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples (``random.setstate`` wants its nested tuple)."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def _check_same_categories(train_set: LvisDataset, other: LvisDataset) -> None:
    a = [(c.id, c.label) for c in train_set.categories]
    b = [(c.id, c.label) for c in other.categories]
    if a != b:
        raise ValueError(f"{other.json_uri} has different categories than {train_set.json_uri}; "
                         "training and evaluation splits must share one category list")

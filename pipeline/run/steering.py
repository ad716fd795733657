"""Closed-loop generation on Ray: the demand actor, and the generation stage that asks it.

::

    trainer ranks ──record(decisions)──▶ DemandBoard (one Ray actor, num_cpus=0)
                                             │ allocation(): class weights, prompt-option
                                             ▼ probabilities, the step they were made at
    prompt positions ──▶ SteeredGeneration (generate stage) ──▶ annotate ──▶ check ──▶ trainer

The source of the Ray Data graph then holds stream positions (and open-loop draws); the
generation actor redraws each batch's classes and prompts with the latest allocation it got
(:class:`DemandClient`), just before generating them, so the feedback reaches the images as
soon as the stream's read-ahead allows. Each row records the trainer step its allocation was
made at (``allocation_step``); the trainer's step at the decision minus it is the loop's lag,
reported in the run summary.

A demand actor that is slow or gone never stops the run: a generation actor waits at most
``feedback.timeout_s`` for an answer, then draws open loop (``allocation_step`` -1) and says
so once in its log, and asks again with the next batch. The state is checkpointed with the
trainer (rank 0 asks the actor for it) and given back to a new actor on ``--resume``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from generators.allocation import Allocation, DemandState, FeedbackSettings, allocate
from generators.columns import ALLOCATION_STEP, STREAM_POSITION

log = logging.getLogger(__name__)


class DemandBoard:
    """The run's class-demand state (a Ray actor; also usable as a plain object).

    Args:
        settings: the feedback settings.
        base_weights: open-loop weight per class [C] (vocabulary order; 0 where a class may
            not be prompted).
        class_ids, frequency, options_per_class: the vocabulary's ids, LVIS groups and prompt
            options per class.
        class_names: for the allocation records.
        state: a checkpointed :meth:`DemandState.to_dict` to continue from.
        step: the trainer step of that state.
    """

    def __init__(self, settings: FeedbackSettings, base_weights: Sequence[float],
                 class_ids: Sequence[int], class_names: Sequence[str],
                 frequency: Sequence[str], options_per_class: Sequence[int],
                 state: Mapping | None = None, step: int = -1) -> None:
        self.settings = settings
        self.base = np.asarray(base_weights, dtype=np.float64)
        self.class_ids = [int(c) for c in class_ids]
        self.class_names = [str(n) for n in class_names]
        self.frequency = list(frequency)
        self.options_per_class = [int(n) for n in options_per_class]
        self.state = (DemandState.from_dict(state) if state is not None else
                      DemandState(self.class_ids, max(self.options_per_class),
                                  settings.half_life))
        if self.state.class_ids != self.class_ids:
            raise ValueError("feedback state: its classes are not this run's vocabulary")
        self.step = int(step)
        self._current: Allocation | None = None
        # Candidates drawn with an allocation so far (a resumed run starts where its decisions
        # are): issued - decided is how far generation runs ahead of the trainer.
        self.issued = self.state.decisions

    def record(self, class_ids: Sequence[int], options: Sequence[int],
               accepted: Sequence[bool], step: int) -> int:
        """Count one rank's decisions made up to trainer step ``step``."""
        counted = self.state.record(class_ids, options, accepted)
        self.step = max(self.step, int(step))
        self._current = None
        return counted

    def current(self) -> Allocation:
        if self._current is None:
            self._current = allocate(self.state, self.base, self.frequency,
                                     self.options_per_class, self.settings)
        return self._current

    def allocation(self, rows: int = 0, max_ahead: float = float("inf")) -> dict[str, Any]:
        """The allocation for a batch of ``rows`` candidates as plain data: ``weights`` [C],
        ``option_probs`` [C, T], ``stopped`` (class ids), ``version`` (decisions seen),
        ``step``, ``ahead`` (candidates drawn but not decided yet) and ``granted``: False when
        drawing ``rows`` more would put generation more than ``max_ahead`` candidates ahead of
        the trainer (then nothing is counted: ask again later)."""
        ahead = self.issued - self.state.decisions
        granted = rows == 0 or ahead + rows <= max_ahead or ahead <= 0
        if granted:
            self.issued += int(rows)
        a = self.current()
        return {"weights": a.weights.tolist(), "option_probs": a.option_probs.tolist(),
                "stopped": list(a.stopped), "version": a.version, "step": self.step,
                "ahead": int(ahead), "granted": bool(granted)}

    def report(self) -> dict[str, Any]:
        """What the metrics' ``allocation`` records hold: per class its share of generation,
        decided/accepted totals and smoothed acceptance rate; per prompt option its decided
        and accepted counts (decayed) over all classes; the classes at their target."""
        a = self.current()
        share = a.weights / a.weights.sum() if a.weights.sum() > 0 else a.weights
        rates = self.state.class_rates()
        classes = {name: {"share": round(float(s), 5), "decided": int(d), "accepted": int(k),
                          "rate": round(float(r), 4)}
                   for name, s, d, k, r in zip(self.class_names, share, self.state.decided,
                                               self.state.accepted, rates)}
        options = {str(t): {"decided": round(float(self.state.option_decided[:, t].sum()), 2),
                            "accepted": round(float(self.state.option_accepted[:, t].sum()), 2)}
                   for t in range(self.state.options)}
        names = dict(zip(self.class_ids, self.class_names))
        return {"version": a.version, "allocation_step": self.step, "classes": classes,
                "options": options, "stopped": [names[c] for c in a.stopped],
                "ahead": int(self.issued - self.state.decisions)}

    def snapshot(self) -> dict[str, Any]:
        """The state for a checkpoint (JSON-safe)."""
        return {"state": self.state.to_dict(), "step": self.step}

    def ping(self) -> bool:
        return True


def start_demand_board(settings: FeedbackSettings, sampler: Any,
                       snapshot: Mapping | None = None) -> Any:
    """The demand actor for a run whose prompts ``sampler`` draws (``snapshot``: from the
    checkpoint being resumed)."""
    import ray

    vocab = sampler.vocabulary
    base = sampler.base_weights * sampler.allowed
    from pipeline.run.progress import CONTROL_ACTOR_OPTIONS

    # On the head node, restarted when its process dies; a restart starts again from the
    # state it was created with (the checkpoint's, or none): the allocation forgets the
    # decisions since, and generation draws open loop until the trainers report again.
    return ray.remote(DemandBoard).options(**CONTROL_ACTOR_OPTIONS).remote(
        settings, base.tolist(), [c.id for c in vocab], [c.name for c in vocab],
        [c.frequency for c in vocab], sampler.options_per_class,
        state=(snapshot or {}).get("state"), step=int((snapshot or {}).get("step", -1)))


class DemandClient:
    """A generation actor's view of the demand actor: the latest allocation, never blocking
    longer than ``timeout_s`` (see the module docstring).

    ``fetch()`` returns an allocation dict, or None when the actor has not answered in time
    or is gone (then open-loop weights apply).
    """

    def __init__(self, board: Any, timeout_s: float) -> None:
        self.board = board
        self.timeout_s = float(timeout_s)
        self._pending: Any = None
        self._stalled = False
        self.dead = False
        self.warned = False

    def fetch(self, rows: int = 0, max_ahead: float = float("inf")) -> dict[str, Any] | None:
        import ray

        if self.dead:
            return None
        if self._pending is None:
            self._pending = self.board.allocation.remote(rows, max_ahead)
        # A stalled actor got its full wait once; until it answers, do not wait again.
        timeout = 0.0 if self._stalled else self.timeout_s
        ready, _ = ray.wait([self._pending], timeout=timeout)
        if not ready:
            self._stalled = True
            self._warn(f"the demand actor did not answer within {self.timeout_s:g} s")
            return None
        ref, self._pending = self._pending, None
        try:
            answer = ray.get(ref)
        except Exception as exc:  # the actor died: open loop for the rest of the run
            self.dead = True
            self._warn(f"the demand actor is gone ({type(exc).__name__})")
            return None
        if self._stalled:
            log.warning("bsgal feedback: the demand actor answers again; steering resumes")
        self._stalled = False
        return answer

    def _warn(self, what: str) -> None:
        if not self.warned:
            log.warning("bsgal feedback: %s; drawing classes and prompts open loop (the run "
                        "goes on)", what)
            self.warned = True


class SteeredGeneration:
    """The generate stage of a closed-loop run: redraws each batch's prompt rows from their
    stream positions with the latest allocation, then generates them.

    Input: the prompt rows (``stream_position`` int64 among them). Output: the generator's,
    with ``class_id``, ``class_name``, ``prompt``, ``prompt_option``, ``sample_id``, ``seed``
    redrawn and ``allocation_step`` (int64: the trainer step of the allocation; -1 for an
    open-loop draw).
    """

    def __init__(self, sampler: Callable[[], Any], generator: Callable[[], Any],
                 board: Any, timeout_s: float, max_ahead: float = float("inf"),
                 max_wait_s: float = 600.0, poll_s: float = 0.2) -> None:
        self.sampler = sampler()
        self.generator = generator()
        self.client = DemandClient(board, timeout_s)
        self.max_ahead, self.max_wait_s, self.poll_s = float(max_ahead), float(max_wait_s), \
            float(poll_s)
        self.waited_out = False
        # Seconds the last batch waited at the bound (TimedStage leaves them out of the
        # stage's busy time: waiting holds no device work).
        self.idle_seconds = 0.0

    def _allocation(self, rows: int) -> dict[str, Any] | None:
        """The allocation for ``rows`` candidates, waiting (up to ``max_wait_s``) while
        generation is more than ``max_ahead`` candidates ahead of the trainer's decisions."""
        deadline = time.monotonic() + self.max_wait_s
        while True:
            answer = self.client.fetch(rows, self.max_ahead)
            if answer is None or answer.get("granted", True):
                return answer
            if time.monotonic() >= deadline:
                # Never hang on the bound: draw anyway, and say so once.
                if not self.waited_out:
                    log.warning("bsgal feedback: generation stayed %d candidates ahead of the "
                                "trainer for %g s; drawing without waiting longer (raise "
                                "feedback.max_ahead if this repeats)", answer["ahead"],
                                self.max_wait_s)
                    self.waited_out = True
                return self.client.fetch(rows)
            time.sleep(self.poll_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        answer = self._allocation(len(batch[STREAM_POSITION]))
        self.idle_seconds = time.perf_counter() - started
        if answer is None:
            self.sampler.set_weights(self.sampler.base_weights)
            self.sampler.set_option_weights(None)
            step = -1
        else:
            self.sampler.set_weights(np.asarray(answer["weights"]))
            self.sampler.set_option_weights(np.asarray(answer["option_probs"]))
            step = int(answer["step"])
        positions = np.asarray(batch[STREAM_POSITION], dtype=np.int64)
        out = dict(batch)
        out.update(self.sampler.sample_positions(positions))
        out[ALLOCATION_STEP] = np.full(len(positions), step, dtype=np.int64)
        return self.generator(out)


def online_sampler(cfg: Any, categories: Sequence[Mapping[str, Any]]) -> Any:
    """The run's prompt sampler for online generation (row i depends only on seed, run name,
    i and the allocation it is drawn with)."""
    from generators import ClassVocabulary, PromptSampler

    g = cfg.generation
    return PromptSampler(ClassVocabulary.from_categories(categories, source="train.json"),
                         run_id=cfg.name, seed=cfg.seed, templates=g.prompt_template,
                         extra_prompts=g.extra_prompts, weighting=g.class_weighting,
                         group_weights=g.group_weights, external_weights=g.external_weights,
                         groups=g.groups, generator=g.backend)

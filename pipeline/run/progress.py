"""Progress of a run: one bar per stage and one for the trainer, drawn by the driver.

Stage actors and trainer workers report to a small Ray actor, :class:`ProgressBoard`
(``num_cpus=0``), with fire-and-forget calls; a driver thread polls it. On a terminal the
driver draws tqdm bars; when stdout is not a terminal (CI logs, ``nohup``) it prints one plain
line every ``interval`` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipeline.storage.row_names import STAGES


class ProgressBoard:
    """Counters of a running job (a Ray actor; every method is cheap).

    Stages report rows done and busy seconds; trainer ranks report their latest state
    (``step``, ``decided``, ``accepted``, ``rejected``, ``invalid``, ``wait_seconds``, ...).
    """

    def __init__(self) -> None:
        self.stages: dict[str, list[float]] = {s: [0, 0.0] for s in STAGES}
        self.ranks: dict[int, dict[str, Any]] = {}
        self.started = time.time()
        self.stop: str | None = None
        # Warnings of bsgal's own code in stage actors and trainer workers (whose output does
        # not reach the console with ray.log_to_driver=false): text -> times seen, in order.
        self.notices: dict[str, int] = {}

    def reset(self) -> None:
        """Forget the counters (the run restarts from a checkpoint); a stop request stays."""
        self.stages = {s: [0, 0.0] for s in STAGES}
        self.ranks = {}

    def request_stop(self, reason: str) -> None:
        """The driver was interrupted: trainer ranks finish their batch, checkpoint and end."""
        self.stop = self.stop or reason

    def stop_requested(self) -> str | None:
        return self.stop

    def stage_done(self, stage: str, rows: int, seconds: float) -> None:
        entry = self.stages.setdefault(stage, [0, 0.0])
        entry[0] += rows
        entry[1] += seconds

    def trainer_state(self, rank: int, state: dict[str, Any]) -> None:
        self.ranks[rank] = dict(state)

    def notice(self, text: str) -> None:
        """A warning from a worker process; the same text again only counts (at most
        `MAX_NOTICES` distinct texts are kept, so a warning in a loop cannot grow the actor)."""
        if text in self.notices:
            self.notices[text] += 1
        elif len(self.notices) < MAX_NOTICES:
            self.notices[text] = 1

    def snapshot(self) -> dict[str, Any]:
        return {"stages": {k: list(v) for k, v in self.stages.items()},
                "ranks": {k: dict(v) for k, v in self.ranks.items()},
                "notices": list(self.notices),
                "elapsed": time.time() - self.started}


#: Distinct worker warnings a board keeps.
MAX_NOTICES = 50

#: The top-level packages whose loggers' warnings are bsgal's own.
OWN_LOGGERS = ("pipeline", "selector", "trainer", "generators", "annotators")


class NoticeForwarder(logging.Handler):
    """Sends WARNING and above of bsgal's own loggers in this process to a board's
    :meth:`ProgressBoard.notice` (fire-and-forget), prefixed with where it happened."""

    def __init__(self, board: Any, where: str) -> None:
        super().__init__(logging.WARNING)
        self.board, self.where = board, where

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().removeprefix("bsgal ")  # the driver says "bsgal"
            self.board.notice.remote(f"{record.levelname.lower()} ({self.where}): {message}")
        except Exception:  # noqa: BLE001 - a warning must never fail the work it is about
            pass


def forward_warnings(board: Any, where: str) -> None:
    """In a stage actor or trainer worker: make bsgal's own warnings reach the driver's
    console through ``board``. Replaces the forwarder of an earlier run in the same process."""
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, NoticeForwarder)]:
            logger.removeHandler(handler)
        logger.addHandler(NoticeForwarder(board, where))
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)


#: Where the run's control actors live: the head node, which outlives the worker nodes (losing
#: it ends the cluster, and the run, anyway). They take no CPU and restart when their process
#: dies; calls to them wait while they restart (bounded by each caller's own timeout).
CONTROL_ACTOR_OPTIONS = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001},
                         "max_restarts": -1, "max_task_retries": -1}


def start_board() -> Any:
    """A :class:`ProgressBoard` actor on the head node (`CONTROL_ACTOR_OPTIONS`). A restart
    loses its counters, which the trainer ranks report again within a second; a stop request
    the driver made is made again by the driver (`StopOnSignal`)."""
    import ray

    return ray.remote(ProgressBoard).options(**CONTROL_ACTOR_OPTIONS).remote()


@dataclass
class TrainerTotals:
    """The trainer ranks' states added up."""

    step: int = 0
    decided: int = 0
    accepted: int = 0
    rejected: int = 0
    invalid: int = 0
    wait_seconds: float = 0.0
    busy_seconds: float = 0.0
    phase: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ranks: dict[int, dict[str, Any]]) -> "TrainerTotals":
        out = cls()
        for state in ranks.values():
            out.step = max(out.step, int(state.get("step", 0)))
            for key in ("decided", "accepted", "rejected", "invalid"):
                setattr(out, key, getattr(out, key) + int(state.get(key, 0)))
            out.wait_seconds += float(state.get("wait_seconds", 0.0))
            out.busy_seconds += float(state.get("busy_seconds", 0.0))
        if ranks:
            out.phase = str(ranks[min(ranks)].get("phase", ""))
        return out

    def describe(self) -> str:
        scored = self.accepted + self.rejected
        acc = f"{self.accepted / scored:.0%}" if scored else "-"
        total = self.wait_seconds + self.busy_seconds
        wait = f"{self.wait_seconds / total:.0%}" if total > 0 else "-"
        return (f"decided {self.decided} (acc {acc} of scored, invalid {self.invalid}), "
                f"waiting {wait}" + (f", {self.phase}" if self.phase else ""))


class NoticePrinter:
    """Prints the workers' warnings a :class:`ProgressBoard` collected, each once, on stderr."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self.printed = 0

    def show(self, notices: list[str], above_bars: bool = False) -> None:
        for text in notices[self.printed:]:
            if above_bars:
                from tqdm import tqdm

                tqdm.write(f"bsgal {text}", file=sys.stderr)
            else:
                print(f"bsgal {text}", file=sys.stderr, flush=True)
        self.printed = max(self.printed, len(notices))

    def poll(self) -> None:
        """Ask the board (bounded wait) and print what is new; a board away prints nothing."""
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - warnings are best effort, like progress
            return
        self.show(snap.get("notices", []))


class ProgressDisplay:
    """Driver-side view of a :class:`ProgressBoard`: tqdm bars or periodic lines.

    Args:
        board: the board actor.
        candidates: candidates this run will make (the stage bars' total).
        steps: scheduled optimizer steps (the trainer bar's total).
        mode: ``"bars"``, ``"lines"``, ``"off"`` or ``"auto"`` (bars on a terminal).
        interval: seconds between lines in ``"lines"`` mode.
        stream: where to draw (default stderr for bars, stdout for lines).
    """

    def __init__(self, board: Any, candidates: int, steps: int, mode: str = "auto",
                 interval: float = 15.0, stream: TextIO | None = None,
                 done_before: tuple[int, int] = (0, 0)) -> None:
        if mode not in ("auto", "bars", "lines", "off"):
            raise ValueError(f"progress mode {mode!r} is not auto, bars, lines or off")
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "lines"
        self.board = board
        self.mode = mode
        self.candidates = candidates
        self.steps = steps
        self.interval = interval
        self.stream = stream
        self.done_before = done_before  # (candidates, step) already done before a resume
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars: dict[str, Any] = {}
        self.last: dict[str, Any] | None = None
        self._first: tuple[float, int, int] | None = None  # (elapsed, step, decided) seen first
        self._phase = ""  # the trainer's phase when _first was seen
        self._notices = NoticePrinter(board)

    def __enter__(self) -> "ProgressDisplay":
        # "off" polls too: the workers' warnings are printed in every mode.
        self._thread = threading.Thread(target=self._run, name="bsgal-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._poll_and_draw(final=True)
        for bar in self._bars.values():
            bar.close()

    def _poll(self) -> dict[str, Any] | None:
        import ray

        try:
            self.last = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception:  # the board is best effort: never fail a run over progress output
            return self.last
        return self.last

    def _run(self) -> None:
        period = {"bars": 0.5, "off": 2.0}.get(self.mode, min(self.interval, 2.0))
        last_line = time.monotonic()
        while not self._stop.wait(period):
            now = time.monotonic()
            self._poll_and_draw(lines=now - last_line >= self.interval)
            if now - last_line >= self.interval:
                last_line = now

    def _poll_and_draw(self, final: bool = False, lines: bool = True) -> None:
        snap = self._poll()
        if snap is None:
            return
        self._notices.show(snap.get("notices", []), above_bars=bool(self._bars))
        if self.mode == "off":
            return
        if self.mode == "bars":
            self._draw_bars(snap)
        elif final or (lines and not self._stop.is_set()):
            self._print_line(snap, final)

    def _draw_bars(self, snap: dict[str, Any]) -> None:
        from tqdm import tqdm

        stream = self.stream or sys.stderr
        base_rows, base_step = self.done_before
        if not self._bars:
            for i, stage in enumerate(STAGES):
                self._bars[stage] = tqdm(total=self.candidates, initial=base_rows,
                                         desc=f"{stage:>8}", unit="cand", position=i,
                                         file=stream, leave=True, dynamic_ncols=True)
            self._bars["train"] = tqdm(total=self.steps, initial=base_step, desc="   train",
                                       unit="step", position=len(STAGES), file=stream,
                                       leave=True, dynamic_ncols=True)
        for stage in STAGES:
            rows = base_rows + int(snap["stages"].get(stage, [0, 0.0])[0])
            bar = self._bars[stage]
            bar.update(min(rows, self.candidates) - bar.n)
        totals = TrainerTotals.of(snap["ranks"])
        bar = self._bars["train"]
        if totals.step > bar.total:
            bar.total = totals.step
        bar.update(max(totals.step, base_step) - bar.n)
        bar.set_postfix_str(totals.describe(), refresh=True)

    def _print_line(self, snap: dict[str, Any], final: bool) -> None:
        base_rows, _ = self.done_before
        stages = "  ".join(
            f"{stage} {base_rows + int(snap['stages'].get(stage, [0, 0.0])[0])}/{self.candidates}"
            for stage in STAGES)
        totals = TrainerTotals.of(snap["ranks"])
        eta = self.eta(snap["elapsed"], totals)
        step = max(totals.step, self.done_before[1])
        line = (f"[{snap['elapsed']:6.0f}s] {stages}  train step {step}/{self.steps}: "
                f"{totals.describe()}" + (f", ETA {format_seconds(eta)}" if eta is not None
                                          else ""))
        print(line, file=self.stream or sys.stdout, flush=True)

    def eta(self, elapsed: float, totals: TrainerTotals) -> float | None:
        """Seconds left at the rates seen since the trainer's first report in its current phase
        (warm-up steps are faster than candidate steps): the longer of the steps still scheduled
        and the candidates still to decide (None before two reports in one phase)."""
        if self._first is None or totals.phase != self._phase:
            self._phase = totals.phase
            self._first = (elapsed, totals.step, totals.decided) if totals.step > 0 else None
            return None
        t0, step0, decided0 = self._first
        dt = elapsed - t0
        if dt <= 0 or totals.step <= step0:
            return None
        left = max(0, self.steps - totals.step) * dt / (totals.step - step0)
        remaining = self.candidates - self.done_before[0] - totals.decided
        if remaining > 0 and totals.decided > decided0:
            left = max(left, remaining * dt / (totals.decided - decided0))
        return left


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class CountProgress:
    """Driver-side progress of work counted in items (``bsgal rescore``): a line every
    ``interval`` seconds with the rate seen so far and an ETA, and the workers' warnings from
    ``board`` (a :class:`ProgressBoard`, or None) as they come.

    Call :meth:`update` with the items just done; :meth:`close` prints the last line.
    """

    def __init__(self, total: int, verb: str, board: Any = None, interval: float = 15.0,
                 stream: TextIO | None = None,
                 clock: Any = time.monotonic) -> None:
        self.total, self.verb, self.board = int(total), verb, board
        self.interval, self.stream, self.clock = float(interval), stream, clock
        self.done = 0
        self.started = self.last = clock()
        self._notices = NoticePrinter(board) if board is not None else None

    def line(self) -> str:
        elapsed = self.clock() - self.started
        text = f"[{elapsed:6.0f}s] {self.verb} {self.done}/{self.total}"
        if 0 < self.done < self.total and elapsed > 0:
            text += f", ETA {format_seconds((self.total - self.done) * elapsed / self.done)}"
        return text

    def update(self, n: int) -> None:
        self.done += int(n)
        if self.clock() - self.last >= self.interval:
            self.last = self.clock()
            if self._notices is not None:
                self._notices.poll()
            print(self.line(), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        if self._notices is not None:
            self._notices.poll()
        print(self.line(), file=self.stream or sys.stdout, flush=True)

"""Progress of a run: one bar per stage and one for the trainer, drawn by the driver.

Stage actors and trainer workers report to a small Ray actor, :class:`ProgressBoard`
(``num_cpus=0``), with fire-and-forget calls; a driver thread polls it. On a terminal the
driver draws tqdm bars; when stdout is not a terminal (CI logs, ``nohup``) it prints one plain
line every ``interval`` seconds instead, so logs stay readable.
"""

from __future__ import annotations

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

    def snapshot(self) -> dict[str, Any]:
        return {"stages": {k: list(v) for k, v in self.stages.items()},
                "ranks": {k: dict(v) for k, v in self.ranks.items()},
                "elapsed": time.time() - self.started}


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

    def __enter__(self) -> "ProgressDisplay":
        if self.mode != "off":
            self._thread = threading.Thread(target=self._run, name="bsgal-progress",
                                            daemon=True)
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
        period = 0.5 if self.mode == "bars" else self.interval
        while not self._stop.wait(period):
            self._poll_and_draw()

    def _poll_and_draw(self, final: bool = False) -> None:
        if self.mode == "off":
            return
        snap = self._poll()
        if snap is None:
            return
        if self.mode == "bars":
            self._draw_bars(snap)
        elif final or not self._stop.is_set():
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
        """Seconds left at the rates seen since the trainer's first report: the longer of the
        steps still scheduled and the candidates still to decide (None before two reports)."""
        if self._first is None:
            if totals.step > 0:
                self._first = (elapsed, totals.step, totals.decided)
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

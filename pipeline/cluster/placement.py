"""Actors and train workers that wait for a node, said out loud, and bounded in time.

A lost spot node leaves its stage actors RESTARTING until a node with the resources they are
pinned to joins; a lost train node leaves Ray Train's placement group PENDING. Ray waits for
them forever, in silence. :class:`PlacementWatch` (a driver thread, around ``fit``) reads this
job's actors and placement groups from the GCS every few seconds, matches what waits to the
run's parts by the resources it asks for (:func:`pipeline.demand.run_requests`) and:

* after ``grace_s`` prints what is pending and since when, then every ``repeat_s``::

      generation: 0 of 1 actors alive, waiting for a node with {CPU: 0.25, bsgal_generate:
      0.01} since 12:03:05; the run checkpoints and stops at 12:13:05 unless one joins
      (ray.placement_timeout_s=600)

* when something waits longer than ``ray.placement_timeout_s``, asks the trainers to
  checkpoint and end (the progress board's stop request: the same as Ctrl-C), and, when the
  train workers themselves are what waits (nobody to ask), aborts Ray Train's controller.

The driver then reports :attr:`PlacementWatch.timed_out` with the resume command. The actor
table is read through Ray's private GCS accessor (the public state API needs the dashboard);
if that changes, the watch says so once and stays quiet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.demand import run_requests

WAITING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")


@dataclass(frozen=True)
class Waiting:
    """Units of one part of the run that wait for a node.

    Attributes:
        part: ``generation``, ``annotation``, ``quality checks``, ``training`` or, for an
            actor that is none of them, its class name.
        waiting: units waiting; ``alive``: units of the same part placed now.
        resources: what one unit asks for.
    """

    part: str
    waiting: int
    alive: int
    resources: tuple[tuple[str, float], ...]

    def line(self, since: float, timeout_s: float) -> str:
        ask = "{" + ", ".join(f"{k}: {v:g}" for k, v in self.resources) + "}"
        unit = "train workers" if self.part == "training" else "actors"
        return (f"{self.part}: {self.alive} of {self.alive + self.waiting} {unit} alive, "
                f"waiting for a node with {ask} since {_clock(since)}; the run checkpoints "
                f"and stops at {_clock(since + timeout_s)} unless one joins "
                f"(ray.placement_timeout_s={timeout_s:g})")


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _key(resources: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, round(float(v), 6)) for k, v in resources.items() if v))


def run_parts(cfg: RunConfig) -> dict[tuple[tuple[str, float], ...], str]:
    """The run's parts by what one unit of each asks for."""
    parts: dict[tuple[tuple[str, float], ...], str] = {}
    for request in run_requests(cfg):
        parts.setdefault(_key(request.unit), request.part)
    return parts


def job_waiting(cfg: RunConfig, job_id: str) -> list[Waiting]:
    """What of job ``job_id`` (hex) waits for a node now: actors not yet placed (or being
    restarted) and Ray Train's placement groups still pending."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    parts = run_parts(cfg)
    names = gcs_pb2.ActorTableData.ActorState.Name
    counts: dict[tuple[str, tuple], list[int]] = {}
    accessor = state._connect_and_get_accessor()
    for raw in accessor.get_actor_table(None, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if actor.job_id.hex() != job_id:
            continue
        status = names(actor.state)
        if status == "DEAD":
            continue
        key = _key(dict(actor.required_resources))
        part = parts.get(key, actor.class_name.split("(")[0])
        entry = counts.setdefault((part, key), [0, 0])
        entry[0 if status in WAITING else 1] += 1
    for group in ray.util.placement_group_table().values():
        if group.get("state") not in ("PENDING", "RESCHEDULING"):
            continue
        bundles = list((group.get("bundles") or {}).values())
        for bundle in bundles:
            key = _key(bundle)
            entry = counts.setdefault((parts.get(key, "training"), key), [0, 0])
            entry[0] += 1
    return [Waiting(part, w, a, key) for (part, key), (w, a) in sorted(counts.items()) if w]


class PlacementWatch:
    """Driver thread: say what waits for a node, and stop the run when it waits too long.

    Args:
        cfg: the run's config (``ray.placement_timeout_s``; the parts' resources).
        board: the progress board (its stop request makes the trainers checkpoint and end).
        echo: where the lines go.
        grace_s: how long something may wait before it is said (placing takes seconds).
        repeat_s: how often a wait is said again.
        period_s: how often the GCS is read.
        waiting: test hook replacing :func:`job_waiting`.
    """

    def __init__(self, cfg: RunConfig, board: Any, echo: Callable[[str], None], *,
                 grace_s: float = 10.0, repeat_s: float = 30.0, period_s: float = 2.0,
                 waiting: Callable[[], list[Waiting]] | None = None) -> None:
        self.cfg = cfg
        self.board = board
        self.echo = echo
        self.timeout_s = float(cfg.ray.placement_timeout_s)
        self.grace_s, self.repeat_s, self.period_s = grace_s, repeat_s, period_s
        self._waiting = waiting
        self._since: dict[tuple[str, tuple], float] = {}
        self._said: dict[tuple[str, tuple], float] = {}
        self.timed_out: str | None = None
        self.stop_reason: str | None = None
        self.controller: Any = None  # Ray Train's controller (set by the trainer at fit)
        self.history: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken = False

    # -- the stop request, kept --------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the trainers to checkpoint and end, and ask again every period (a restarted
        board forgets it)."""
        self.stop_reason = self.stop_reason or reason
        self._send_stop()

    def _send_stop(self) -> None:
        if self.stop_reason is None:
            return
        try:
            self.board.request_stop.remote(self.stop_reason)
        except Exception:  # noqa: BLE001 - the board is restarting: the next period retries
            pass

    # -- the loop ----------------------------------------------------------------------

    def _read(self) -> list[Waiting]:
        if self._waiting is not None:
            return self._waiting()
        import ray

        return job_waiting(self.cfg, ray.get_runtime_context().get_job_id())

    def check(self, now: float | None = None) -> None:
        """One look: record what waits, say it, time it out."""
        now = time.time() if now is None else now
        try:
            found = self._read()
        except Exception as exc:  # noqa: BLE001 - a private API, or the GCS is away
            if not self._broken:
                self._broken = True
                self.echo(f"warning: cannot read which actors wait for a node "
                          f"({type(exc).__name__}: {str(exc)[:120]})")
            return
        keys = {(w.part, w.resources): w for w in found}
        for key in list(self._since):
            if key not in keys:
                waited = now - self._since.pop(key)
                if key in self._said:
                    self._said.pop(key)
                    self.echo(f"{key[0]}: placed again after {waited:.0f} s")
                    self.history.append({"part": key[0], "seconds": waited, "placed": True})
        late = []
        for key, item in keys.items():
            since = self._since.setdefault(key, now)
            waited = now - since
            if waited >= self.grace_s and now - self._said.get(key, -1e18) >= self.repeat_s:
                self._said[key] = now
                self.echo(item.line(since, self.timeout_s))
            if waited >= self.timeout_s:
                late.append((item, waited))
        if late and self.timed_out is None:
            self._time_out(late)
        self._send_stop()

    def _time_out(self, late: list[tuple[Waiting, float]]) -> None:
        parts, needs = [], []
        for item, waited in late:
            parts.append(f"{item.part} ({item.waiting} waited {waited:.0f} s)")
            pins = [k for k, _ in item.resources if k not in ("CPU", "GPU")]
            needs.extend(pins or [", ".join(f"{v:g} {k}" for k, v in item.resources)])
            self.history.append({"part": item.part, "seconds": waited, "placed": False})
        self.timed_out = (f"no node could hold {', '.join(parts)} within "
                          f"ray.placement_timeout_s={self.timeout_s:g}; add a node that offers "
                          f"{', '.join(dict.fromkeys(needs))} to the cluster (or raise "
                          "ray.placement_timeout_s)")
        self.echo(f"{self.timed_out}: stopping the run at its next checkpoint")
        self.stop_reason = self.stop_reason or "placement timeout"  # sent at the end of check
        if any(item.part == "training" for item, _ in late) and self.controller is not None:
            # The train workers are what waits: there is nobody to ask to checkpoint.
            import ray

            try:
                ray.kill(self.controller)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.check()

    def __enter__(self) -> "PlacementWatch":
        self._thread = threading.Thread(target=self._run, name="bsgal-placement", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

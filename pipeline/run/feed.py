"""The trainer's side of the candidate stream: batches from Ray Data, waited for or polled.

A background thread walks the worker's dataset shard (``iter_batches``) and hands batches over a
small queue, so that the training loop can either block until the next batch arrives (``wait``:
deterministic, the decisions do not depend on timing) or take a real-only step when none is
ready yet (``poll``: no idle accelerator, decisions depend on timing). An error in the stream is
raised in the training loop at the next call.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

END = object()  # the stream is exhausted


class CandidateFeed:
    """Hands candidate batches (dicts of numpy columns) to the training loop.

    Args:
        batches: an iterable of batches, e.g. ``shard.iter_batches(batch_size=...,
            batch_format="numpy")``; it is consumed in a background thread.
        depth: batches held ready at most.
    """

    def __init__(self, batches: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._batches = batches
        self.exhausted = False
        self._thread = threading.Thread(target=self._run, name="bsgal-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", batch), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            item: tuple[str, Any] = ("end", None)
        except BaseException as exc:  # raised in the training loop by next()
            item = ("error", exc)
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def next(self, block: bool = True, interrupted: Callable[[], bool] | None = None
             ) -> tuple[Any, float]:
        """The next batch, :data:`END`, or None (``block=False`` and nothing ready yet, or
        ``interrupted()`` turned true while waiting), with the seconds spent waiting for it."""
        if self.exhausted:
            return END, 0.0
        started = time.perf_counter()
        while True:
            try:
                kind, item = self._queue.get(block=block,
                                             timeout=0.5 if block and interrupted else None)
                break
            except queue.Empty:
                if not block or (interrupted is not None and interrupted()):
                    return None, time.perf_counter() - started
        waited = time.perf_counter() - started
        if kind == "error":
            raise item
        if kind == "end":
            self.exhausted = True
            return END, waited
        return item, waited

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

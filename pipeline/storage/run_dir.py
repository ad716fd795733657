"""The run folder: resolved config, metrics over time, checkpoints, evaluation, shards.

::

    OUT/config.yaml                 the resolved config the run was started with
    OUT/metrics.jsonl               one JSON object per line: {"time", "kind", "step", ...}
    OUT/checkpoints/step-000000100.pt   model + optimizer + cache + threshold + RNG + offsets
    OUT/eval.json                   final LVIS evaluation
    OUT/summary.json                counts and where things are, written at the end
    OUT/shards/decision=*/part-*.parquet   (pipeline/storage/shards.py)

OUT is a local folder or ``s3://bucket/prefix``. Checkpoints are written with ``torch.save``
to a temporary name and then moved into place (an object store makes the final object visible
only when its upload completes), and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import threading
import time
from typing import Any

from pipeline.config import ConfigError
from pipeline.storage.filesystem import filesystem, is_local

CHECKPOINT_NAME = re.compile(r"^step-(\d{9})\.pt$")


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot carry (NaN, inf) become None; numpy scalars become Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """Paths and small-file I/O for one run folder (local or remote).

    Attributes:
        out: the folder as given (trailing ``/`` removed); ``fs``/``path``: its fsspec
            filesystem and the path inside it; ``local``: whether ``fs`` is the local disk.
    """

    def __init__(self, out: str, storage_options: dict | None = None) -> None:
        self.out = out.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = filesystem(self.out, self.storage_options)
        self.local = is_local(self.fs)

    # -- paths --

    def uri(self, *parts: str) -> str:
        """``OUT/part/...`` as the user named it (local path or URI)."""
        return _join(self.out, *parts)

    def path_of(self, *parts: str) -> str:
        """``OUT/part/...`` as a path inside :attr:`fs` (no protocol)."""
        return _join(self.path, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path_of(*parts))

    # -- small files --

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``OUT/name`` so that readers see the old or the new content, never a part."""
        final = self.path_of(name)
        if self.local:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{int(time.time() * 1e6)}"
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, final)
        else:
            with self.fs.open(final, "wb") as fh:
                fh.write(data)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path_of(name), "rb") as fh:
            return fh.read()

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(_jsonable(obj), indent=2).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    # -- checkpoints --

    def checkpoint_name(self, step: int) -> str:
        return f"checkpoints/step-{step:09d}.pt"

    def list_checkpoints(self) -> list[tuple[int, str]]:
        """(step, name) of every finished checkpoint, oldest first."""
        folder = self.path_of("checkpoints")
        if not self.fs.exists(folder):
            return []
        found = []
        for p in self.fs.ls(folder, detail=False):
            m = CHECKPOINT_NAME.match(posixpath.basename(p))
            if m:
                found.append((int(m.group(1)), f"checkpoints/{posixpath.basename(p)}"))
        return sorted(found)

    def latest_checkpoint(self) -> str | None:
        found = self.list_checkpoints()
        return found[-1][1] if found else None

    def save_checkpoint(self, step: int, state: dict, keep: int = 3) -> str:
        """Save ``state`` (tensors, numbers, strings, lists, dicts) as ``step-N.pt``.

        Keeps the newest ``keep`` checkpoints.
        """
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        name = self.checkpoint_name(step)
        self.write_bytes(name, buf.getvalue())
        for _, old in self.list_checkpoints()[:-keep] if keep > 0 else []:
            self.fs.rm(self.path_of(old))
        return name

    def load_checkpoint(self, name: str, map_location: str = "cpu") -> dict:
        """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
        import torch

        return torch.load(io.BytesIO(self.read_bytes(name)), map_location=map_location,
                          weights_only=True)


class MetricsLog:
    """Appends metric records to ``OUT/metrics.jsonl``.

    Locally each record is appended and flushed at once. On an object store (no append) the
    records are kept and the whole file is rewritten at most every ``upload_seconds`` and on
    :meth:`close`, so a crash loses at most that much of the log.
    """

    def __init__(self, run: RunDir, name: str = "metrics.jsonl",
                 upload_seconds: float = 30.0) -> None:
        self.run = run
        self.name = name
        self.upload_seconds = upload_seconds
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._last_upload = 0.0
        if not run.local and run.exists(name):
            self._lines = run.read_bytes(name).decode().splitlines()

    def log(self, kind: str, step: int | None = None, **values: Any) -> None:
        record = {"time": round(time.time(), 3), "kind": kind, "step": step,
                  **_jsonable(values)}
        line = json.dumps(record)
        with self._lock:
            if self.run.local:
                path = self.run.path_of(self.name)
                self.run.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
            else:
                self._lines.append(line)
                if time.monotonic() - self._last_upload >= self.upload_seconds:
                    self._upload()

    def _upload(self) -> None:
        self.run.write_bytes(self.name, ("\n".join(self._lines) + "\n").encode())
        self._last_upload = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self.run.local and self._lines:
                self._upload()


def read_metrics(run: RunDir, name: str = "metrics.jsonl") -> list[dict]:
    """All records of a run's metrics log (empty when there is none yet)."""
    if not run.exists(name):
        return []
    return [json.loads(line) for line in run.read_bytes(name).decode().splitlines() if line]


# ------------------------------------------------------------------ a run folder's life cycle


class RunExistsError(ConfigError):
    """``output.dir`` already holds a run and ``--resume`` was not asked for."""


def check_fresh_output(run: RunDir) -> None:
    """Refuse an ``output.dir`` that holds a run; a run that stopped before its first
    checkpoint (nothing decided is kept) is named as such, with the retry that fixes it."""
    for marker in ("config.yaml", "checkpoints", "shards"):
        if run.exists(marker):
            if run.latest_checkpoint() is None and not run.exists("summary.json"):
                raise RunExistsError(
                    f"output.dir: {run.out} holds a run that stopped before its first "
                    f"checkpoint ({marker}); unless it is still running, retry it with "
                    f"`bsgal run --resume {run.out} [key=value ...]` (with no checkpoint yet any "
                    "key may change) or choose another output.dir")
            raise RunExistsError(
                f"output.dir: {run.out} already holds a run ({marker}); continue it with "
                f"`bsgal run --resume {run.out}` or choose another output.dir")


def remove_failed_start(run: RunDir) -> bool:
    """Delete what a fresh run wrote when it ends before its first checkpoint, so that the
    same command can simply be run again; a run with a checkpoint is kept for ``--resume``.
    Returns whether anything was removed."""
    run.fs.invalidate_cache()
    if run.latest_checkpoint() is not None or run.exists("summary.json"):
        return False
    removed = False
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "shards", "checkpoints",
                 ".ray-train"):
        if run.exists(name):
            run.fs.rm(run.path_of(name), recursive=True)
            removed = True
    for path in run.fs.glob(run.path_of("metrics-r*.jsonl")):
        run.fs.rm(path)
        removed = True
    if run.local:  # the folder itself, when the start left nothing else in it
        try:
            os.rmdir(run.path_of())
        except OSError:
            pass  # not empty (the user's files) or already gone
    return removed

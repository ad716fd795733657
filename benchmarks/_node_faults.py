"""Node faults for benchmarks/faults.py: a demo-sized run on a real 3-node Ray cluster on this
machine (benchmarks/_ray_cluster.py), its stages and trainer pinned to their nodes as
deploy/ describes, and one node lost mid-run:

* ``stage_node_lost``: the node of the generation and annotation actors, as soon as they run;
  a replacement joins 10 s later. The run must finish by itself.
* ``control_actors_lost``: the processes of the progress (and demand) actors on the head are
  killed at a number of decided rows; Ray restarts them. The run must finish by itself.
* ``train_node_lost``: the node of the train worker, at a number of decided rows; a replacement
  joins 10 s later. The run must restart from its checkpoint and finish by itself.
* ``head_lost``: the head node (GCS, raylet, the control actors) at a number of decided rows:
  the cluster is gone; a new one is started and the run resumed on it with ``bsgal run
  --resume OUT ray.address=NEW`` (one manual resume: nothing survives the head without GCS
  fault tolerance).

Each is checked against an uninterrupted run on the same cluster, as the other kinds are; the
time from the loss until decided rows grow again is recorded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._ray_cluster import LocalCluster, cluster_env, cmdline

NODE_KINDS = ("stage_node_lost", "control_actors_lost", "train_node_lost", "head_lost")
STAGE_NODE = {"bsgal_generate": 1, "bsgal_annotate": 1}
TRAIN_NODE = {"bsgal_train": 1}
REPLACEMENT_AFTER_S = 10.0


def pins(address: str) -> list[str]:
    """Overrides that place the stages and the trainer on their nodes (deploy/cluster.yaml)."""
    return [f"ray.address={address}", "generation.resources={bsgal_generate: 0.01}",
            "annotation.resources={bsgal_annotate: 0.01}",
            "training.resources_per_worker={bsgal_train: 0.01}",
            "training.num_cpus_per_worker=1", "ray.placement_timeout_s=180"]


class NodeFaults:
    """A cluster kept whole between faults: head (1 CPU), a stage node (2 CPUs) and a train
    node (1 CPU); whatever a fault took is started again before the next. ``private``: a
    folder the train nodes see as an empty one of their own (a disk the others do not share;
    benchmarks/_ray_cluster.py)."""

    def __init__(self, work: Path, private: Path | None = None) -> None:
        self.work = work
        self.private = private
        self.cluster: LocalCluster | None = None
        self.stage = self.train = None
        self._serial = 0

    def _name(self, base: str) -> str:
        self._serial += 1
        return f"{base}{self._serial}"

    def ensure(self) -> LocalCluster:
        if self.cluster is None or self.cluster.head is None or \
                self.cluster.head.proc.poll() is not None:
            if self.cluster is not None:
                self.cluster.close()
            self.cluster = LocalCluster(self.work / self._name("cluster"))
            self.cluster.start_head(num_cpus=1)
            self.stage = self.train = None
        if self.stage is None or self.stage.proc.poll() is not None:
            self.stage = self.cluster.add_node(self._name("stage"), 2, STAGE_NODE)
        if self.train is None or self.train.proc.poll() is not None:
            self.train = self.cluster.add_node(self._name("train"), 1, TRAIN_NODE,
                                               private=self.private)
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def _replace_later(self, which: str) -> None:
        def join() -> None:
            time.sleep(REPLACEMENT_AFTER_S)
            assert self.cluster is not None
            if which == "stage":
                node = self.cluster.add_node(self._name(which), 2, STAGE_NODE, wait=False)
            else:
                node = self.cluster.add_node(self._name(which), 1, TRAIN_NODE,
                                             private=self.private, wait=False)
            setattr(self, which, node)

        threading.Thread(target=join, daemon=True).start()

    def due(self, kind: str, rows: int, at_rows: int) -> bool:
        if kind == "stage_node_lost":
            assert self.stage is not None
            return any("MapWorker" in cmdline(p) for p in self.stage.pids())
        return rows >= at_rows

    def inject(self, kind: str) -> bool:
        assert self.cluster is not None
        if kind == "stage_node_lost":
            self.cluster.kill(self.stage)
            self._replace_later("stage")
            return True
        if kind == "train_node_lost":
            self.cluster.kill(self.train)
            self._replace_later("train")
            return True
        if kind == "control_actors_lost":
            assert self.cluster.head is not None
            pids = [p for p in self.cluster.head.pids()
                    if "ProgressBoard" in cmdline(p) or "DemandBoard" in cmdline(p)]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return bool(pids)
        if kind == "head_lost":
            self.cluster.close()  # the workers' raylets cannot outlive their GCS either
            return True
        raise ValueError(f"unknown node fault {kind!r}; use one of {NODE_KINDS}")


def run_node_fault(bench: NodeFaults, index: int, kind: str, config: str,
                   overrides: list[str], out: str, log: Path, timeout: float,
                   at_rows: int, start: Any, decided_rows: Any, wait_exit: Any,
                   kill_session: Any) -> dict[str, Any]:
    """Run once with ``kind`` injected; returns what :func:`faults.run_fault` checks:
    ``injected``, ``first_exit``, ``resumes``, ``recovery_s`` and ``error``."""
    cluster = bench.ensure()
    result: dict[str, Any] = {"injected": False, "first_exit": None, "resumes": 0,
                              "recovery_s": None, "error": ""}
    proc = start(["run", "--config", config, "--progress", "lines", *overrides,
                  *pins(cluster.address)], log)
    deadline = time.monotonic() + timeout
    lost_at = rows_at_loss = None
    while proc.poll() is None and time.monotonic() < deadline:
        rows = decided_rows(out, None)
        if lost_at is None and bench.due(kind, rows, at_rows):
            result["injected"] = bench.inject(kind)
            lost_at, rows_at_loss = time.monotonic(), rows
            if kind == "head_lost":
                kill_session(proc)  # the driver ran on the head machine
                break
        if lost_at is not None and result["recovery_s"] is None and rows > rows_at_loss:
            result["recovery_s"] = time.monotonic() - lost_at
        time.sleep(0.1 if lost_at is None and kind == "stage_node_lost" else 0.5)
    code = wait_exit(proc, max(1.0, deadline - time.monotonic()))
    kill_session(proc)
    result["first_exit"] = code
    if code is None:
        result["error"] = f"the run did not end within {timeout:.0f} s (hang)"
        return result
    if kind == "head_lost":
        cluster = bench.ensure()  # a new cluster: the old one died with its head
        started = time.monotonic()
        proc = start(["run", "--resume", out, "--progress", "lines",
                      f"ray.address={cluster.address}"], log)
        result["resumes"] = 1
        while proc.poll() is None and time.monotonic() - started < timeout:
            if result["recovery_s"] is None and decided_rows(out, None) > (rows_at_loss or 0):
                result["recovery_s"] = time.monotonic() - lost_at
            time.sleep(0.5)
        code = wait_exit(proc, 5.0)
        kill_session(proc)
        if code != 0:
            result["error"] = f"the resume on a new cluster exited {code}"
    elif code != 0:
        result["error"] = f"the run did not finish by itself (exit {code}); see {log}"
    if not result["injected"]:
        result["error"] = result["error"] or "the fault was never injected (the run ended first)"
    return result


__all__ = ["NODE_KINDS", "NodeFaults", "cluster_env", "pins", "run_node_fault"]

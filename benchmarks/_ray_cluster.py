"""A real multi-node Ray cluster on this one machine, for the node-fault tests and benchmark.

Each node is its own ``ray start --block`` (own temp dir, own raylet and workers) in a session
of its own, so that a node can be "lost" by killing everything of that session at once, as
when a spot instance is reclaimed; the cluster is torn down the same way, by PID. It never calls
``ray stop``, which would stop every Ray instance on the machine.

    cluster = LocalCluster(work_dir)
    cluster.start_head(num_cpus=1)
    stage = cluster.add_node("stage", num_cpus=2, resources={"bsgal_generate": 1})
    ...  # bsgal run ... ray.address=cluster.address
    cluster.kill(stage)          # the node is lost
    cluster.close()

``add_node(..., private=PATH)`` starts the node in a mount namespace of its own
(``unshare -m``) with an empty tmpfs over ``PATH``: its processes see a different ``PATH``
than every other node, as nodes that do not share a disk do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cmdline(pid: int) -> str:
    """A process's command line ("" once it is gone); Ray names its workers ``ray::Class``."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def can_unshare() -> bool:
    """Whether this machine lets a process make a private mount namespace (root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


#: The GCS declares a node dead after ~3 s without an answer (Ray's default is ~30 s): a
#: lost node is noticed in the time a cloud's preemption notice gives, and tests stay short.
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000",
                 "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"}


def cluster_env() -> dict[str, str]:
    """Environment of the nodes and of a driver run against them: this code importable, no
    usage stats, one BLAS thread per process, quick node-death detection."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", **HEALTH_CHECKS}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    resources: dict[str, float] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """Every process of the node's session (the raylet, its workers, the head's GCS)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == self.proc.pid:
                        found.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    pass
        return found


class LocalCluster:
    """A head and worker nodes started with ``ray start`` on 127.0.0.1 (module docstring)."""

    def __init__(self, work_dir: str | Path) -> None:
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self._ray = str(Path(sys.executable).parent / "ray")

    # -- nodes --------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], resources: dict[str, float],
               private: str | Path | None) -> Node:
        temp = Path(f"/tmp/bsgal-rc-{self.port}-{name}")  # short: Ray's socket paths
        temp.mkdir(parents=True, exist_ok=True)
        command = [self._ray, "start", *args, "--node-ip-address=127.0.0.1",
                   f"--temp-dir={temp}", "--disable-usage-stats", "--block"]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        if private is not None:
            Path(private).mkdir(parents=True, exist_ok=True)
            script = 'mount -t tmpfs bsgal-private "$1" && shift && exec "$@"'
            command = ["unshare", "-m", "sh", "-c", script, "sh", str(private), *command]
        log = open(self.work / f"node-{name}.log", "ab")
        proc = subprocess.Popen(command, env=cluster_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, temp, dict(resources))
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                   timeout: float = 60.0) -> Node:
        self.head = self._start("head", ["--head", f"--port={self.port}",
                                         f"--num-cpus={num_cpus}", "--include-dashboard=false",
                                         f"--ray-client-server-port={free_port()}",
                                         f"--node-manager-port={free_port()}",
                                         f"--object-manager-port={free_port()}"],
                                resources or {}, None)
        self.wait_for_nodes(1, timeout)
        return self.head

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 private: str | Path | None = None, wait: bool = True,
                 timeout: float = 60.0) -> Node:
        """A worker node; ``private``: a path this node alone sees as an empty folder."""
        before = sum(1 for n in self.nodes if n.proc.poll() is None)
        node = self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}",
                                  f"--node-manager-port={free_port()}",
                                  f"--object-manager-port={free_port()}"],
                           resources or {}, private)
        if wait:
            self.wait_for_nodes(before + 1, timeout)
        return node

    def kill(self, node: Node) -> None:
        """Lose the node: SIGKILL everything of its session at once."""
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in node.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait()
        if node in self.nodes:
            self.nodes.remove(node)

    def close(self) -> None:
        for node in list(reversed(self.nodes)):
            self.kill(node)
        for node_dir in Path("/tmp").glob(f"bsgal-rc-{self.port}-*"):
            shutil.rmtree(node_dir, ignore_errors=True)

    # -- state ---------------------------------------------------------------------------

    def _ask(self, code: str, timeout: float) -> str:
        """Run ``code`` in a short Python connected to the cluster (``ray`` and ``address``
        bound) and return its last line: this process stays Ray-free."""
        script = ("import json, time, ray\naddress = %r\n" % self.address
                  + "ray.init(address=address, logging_level='ERROR', log_to_driver=False)\n"
                  + code)
        done = subprocess.run([sys.executable, "-c", script], env=cluster_env(),
                              capture_output=True, text=True, timeout=timeout + 60)
        if done.returncode != 0:
            raise RuntimeError(f"cannot read the cluster at {self.address}: "
                               f"{done.stderr.strip().splitlines()[-1:]}")
        return done.stdout.strip().splitlines()[-1]

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The GCS's alive nodes: ``{"id", "resources"}`` each."""
        return json.loads(self._ask(
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} "
            "for n in ray.nodes() if n['Alive']]))", 30))

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` nodes are alive (raises after ``timeout`` seconds)."""
        dead = [n.name for n in self.nodes if n.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"ray start exited for {dead}; see {self.work}/node-*.log")
        code = ("deadline = time.monotonic() + %r\n"
                "while sum(n['Alive'] for n in ray.nodes()) < %d and "
                "time.monotonic() < deadline:\n    time.sleep(0.3)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))" % (timeout, count))
        deadline = time.monotonic() + timeout
        while True:  # the head's GCS may not answer for the first seconds
            try:
                alive = int(self._ask(code, timeout))
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if alive < count:
            raise RuntimeError(f"the cluster at {self.address} has {alive} of {count} nodes "
                               f"after {timeout:.0f} s; see {self.work}/node-*.log")

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

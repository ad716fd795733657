"""What the connected cluster's nodes offer, and whether they all see the run's output.

Run by the driver once it is connected (``bsgal run``, ``--resume``, ``bsgal check``):

* :func:`connected_capacity`: the alive nodes (``ray.nodes()``), or, where an autoscaler
  reports its node types, every node type at its maximum; what
  :func:`pipeline.cluster.capacity.check_capacity` checks the custom resources (the
  ``bsgal_*`` pins) and the per-node fit against, before anything is placed (Ray would wait
  for an actor no node can hold forever);
* :func:`output_sharing_problem`: a local ``output.dir`` must be the same folder on every node
  that can hold a train worker (the workers write the shards and checkpoints, the driver reads
  them back). The driver writes a probe, a zero-CPU task pinned to each such node reads it and
  answers with a file of its own, which the driver reads back. ``s3://`` (any URL) is shared by
  construction.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

from pipeline.cluster.capacity import ClusterCapacity, NodeShape, is_bookkeeping, \
    autoscaler_max_resources, launcher_capacity, units_that_fit
from pipeline.config import RunConfig
from pipeline.demand import run_requests

PROBE_FOLDER = ".bsgal-node-probe"


@dataclass(frozen=True)
class ClusterFacts:
    """What ``bsgal check`` learns from a connected cluster: whether the job fits (``fit``:
    the passed line, or ``fit_problem``; ``fit_warnings`` where an autoscaler may add nodes)
    and whether every train node sees ``output.dir``."""

    fit: str | None = None
    fit_problem: str | None = None
    fit_warnings: tuple[str, ...] = ()
    output_problem: str | None = None
    output_notes: tuple[str, ...] = ()


def cluster_facts(cfg: RunConfig, shared_output: bool = True) -> ClusterFacts:
    """Judge ``cfg`` against the cluster this process is connected to."""
    from pipeline.cluster.capacity import check_capacity
    from pipeline.config import ConfigError

    problem, notes = output_sharing_problem(cfg) if shared_output else (None, [])
    cap = connected_capacity()
    pins = sorted({k for r in run_requests(cfg) if r.count > 0 for k in r.unit}
                  - {"CPU", "GPU"})
    try:
        warnings = check_capacity(cfg, cap)
    except ConfigError as exc:
        return ClusterFacts(fit_problem=str(exc), output_problem=problem,
                            output_notes=tuple(notes))
    fit = (f"the job fits the cluster ({cap.source}: {cap.total('CPU'):g} CPUs, "
           f"{cap.total('GPU'):g} GPUs" + "".join(f", {cap.total(r):g} {r}" for r in pins)
           + ")")
    return ClusterFacts(fit=fit, fit_warnings=tuple(warnings), output_problem=problem,
                        output_notes=tuple(notes))


@dataclass(frozen=True)
class LiveNode:
    """An alive node: its id (hex), address and the resources it offers (no bookkeeping)."""

    node_id: str
    address: str
    resources: dict[str, float]

    def describe(self) -> str:
        pins = {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}
        extra = ", ".join(f"{k} {v:g}" for k, v in sorted(pins.items()))
        return (f"node {self.node_id[:8]} ({self.address}, {self.resources.get('CPU', 0):g} "
                f"CPU, {self.resources.get('GPU', 0):g} GPU" + (f", {extra}" if extra else "")
                + ")")


def live_nodes() -> list[LiveNode]:
    """The alive nodes of the Ray this process is connected to."""
    import ray

    found = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = {k: float(v) for k, v in (node.get("Resources") or {}).items()
                     if not is_bookkeeping(k)}
        found.append(LiveNode(str(node["NodeID"]), str(node.get("NodeManagerAddress", "?")),
                              resources))
    return found


def connected_capacity(bootstrap_config: str = "~/ray_bootstrap_config.yaml"
                       ) -> ClusterCapacity:
    """The nodes the run can be placed on: the autoscaler's node types at their maximum where
    the head holds a cluster launcher config (the launcher's bootstrap YAML), else the alive
    nodes, plus what an autoscaler reports it may add (as one node of that size: Ray reports
    totals, not node types)."""
    path = os.path.expanduser(bootstrap_config)
    if os.path.isfile(path):
        return launcher_capacity(path)
    alive = live_nodes()
    nodes = [NodeShape(n.node_id[:8], n.resources) for n in alive]
    source = f"the {len(alive)} alive nodes"
    limits = autoscaler_max_resources(bootstrap_config) or {}  # the GCS's word (no YAML here)
    if limits:
        spare = {}
        for name, most in limits.items():
            have = sum(n.resources.get(name, 0.0) for n in alive)
            if float(most) > have:
                spare[name] = float(most) - have
        if spare:
            nodes.append(NodeShape("autoscaler", spare))
            source += " and what the autoscaler may add"
    return ClusterCapacity(tuple(nodes), bound=True, source=source)


def train_nodes(cfg: RunConfig, nodes: list[LiveNode]) -> list[LiveNode]:
    """The alive nodes that can hold one of the run's train workers."""
    unit = next(r.unit for r in run_requests(cfg) if r.part == "training")
    return [n for n in nodes
            if units_that_fit(unit, ClusterCapacity((NodeShape("n", n.resources),), True, ""))]


def _answer_probe(folder: str, token: str, node_id: str) -> str | None:
    """On one node: None when ``folder/token`` holds ``token`` (and the answer file was
    written), else what this node sees instead."""
    path = os.path.join(folder, token)
    try:
        with open(path) as fh:
            seen = fh.read()
    except OSError as exc:
        return f"it cannot read {path} ({exc.strerror or type(exc).__name__})"
    if seen != token:
        return f"{path} holds something else there"
    try:
        with open(os.path.join(folder, f"{token}.{node_id}"), "w") as fh:
            fh.write(node_id)
    except OSError as exc:
        return f"it cannot write to {folder} ({exc.strerror or type(exc).__name__})"
    return None


def output_sharing_problem(cfg: RunConfig, timeout_s: float = 60.0
                           ) -> tuple[str | None, list[str]]:
    """Whether every node that can hold a train worker sees ``cfg.output.dir`` as the folder
    the driver sees. Returns ``(problem or None, notes)``; a URL output is shared."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.storage.filesystem import is_uri

    out = cfg.output.dir
    if is_uri(out) and not out.startswith("file://"):
        return None, []
    out = out.removeprefix("file://")
    nodes = train_nodes(cfg, live_nodes())
    if not nodes:
        return None, [f"output.dir {out}: no node that can hold a train worker is up yet, so "
                      "whether it sees this folder is not known; use s3:// or a folder every "
                      "node mounts"]
    me = ray.get_runtime_context().get_node_id()
    others = [n for n in nodes if n.node_id != me]
    if not others:
        return None, []
    folder = posixpath.join(out, PROBE_FOLDER)
    token = uuid.uuid4().hex
    made_out = not os.path.exists(out)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, token), "w") as fh:
        fh.write(token)
    answer = ray.remote(num_cpus=0, max_retries=0)(_answer_probe)
    try:
        refs = [answer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n.node_id, soft=False)).remote(folder, token, n.node_id) for n in others]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        problems = []
        for node, ref in zip(others, refs):
            if ref not in ready:
                problems.append(f"{node.describe()} did not answer within {timeout_s:g} s")
                continue
            seen = ray.get(ref)
            if seen is None and not os.path.exists(os.path.join(folder,
                                                                f"{token}.{node.node_id}")):
                seen = "what it wrote there does not reach the driver's node"
            if seen is not None:
                problems.append(f"{node.describe()}: {seen}")
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        if made_out:  # a check leaves no empty run folder behind
            shutil.rmtree(out, ignore_errors=True)
    if not problems:
        return None, [f"output.dir {out} is the same folder on the {len(others) + 1} nodes "
                      "that write it"]
    return (f"output.dir: {out} is a local folder that the train nodes do not share with the "
            f"driver ({'; '.join(problems)}): the train workers would write the run where the "
            "driver cannot read it back. Use output.dir=s3://bucket/prefix (with "
            "output.storage_options for its endpoint) or a folder that every node mounts at "
            "the same path (NFS, EFS, a shared volume)"), []


def describe_nodes(nodes: list[LiveNode]) -> dict[str, str]:
    """``{node id: description}`` for naming lost nodes later."""
    return {n.node_id: n.describe() for n in nodes}


def lost_since(before: dict[str, str]) -> list[str]:
    """Descriptions of the nodes of ``before`` that are not alive now."""
    try:
        alive = {n.node_id for n in live_nodes()}
    except Exception:  # the GCS itself is gone (head lost)
        return list(before.values())
    return [text for node_id, text in before.items() if node_id not in alive]


__all__ = ["ClusterFacts", "LiveNode", "cluster_facts", "connected_capacity", "describe_nodes",
           "live_nodes", "lost_since", "output_sharing_problem", "train_nodes"]

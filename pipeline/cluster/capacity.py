"""What a Ray cluster offers and whether a run's actors and train workers fit it.

Used by ``bsgal submit`` before a job is sent, from a machine that is not part of the cluster:

* :func:`live_capacity` reads the alive nodes' resources from the dashboard's state API
  (``/api/v0/nodes``, what ``ray list nodes`` shows) and whether an autoscaler reports to the
  cluster (``/api/cluster_status``); plain HTTP with a timeout, no ``ray.init``;
* :func:`launcher_capacity` reads a Ray cluster launcher YAML (``deploy/cluster.yaml``): every
  node type at its ``max_workers``, the most an autoscaling cluster can grow to;
* the run's demand is :func:`pipeline.demand.run_requests`: each stage pool (actors x
  per-actor resources) and the trainer workers, with custom resources that pin them;
* :func:`check_capacity` raises :class:`ConfigError` when they cannot all be placed at once
  (Ray would wait for them forever) and returns warnings where the answer is not known (an
  autoscaling cluster whose maximum was not given).

The CPU/GPU totals are checked by :func:`pipeline.demand.check_fits` (the same check
``bsgal run`` makes once connected); this module adds custom resources and whether each actor
fits on one node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.demand import check_fits, run_requests

#: Resources every Ray node advertises that a run never asks for by name.
_BOOKKEEPING = ("memory", "object_store_memory", "node:", "accelerator_type:")


@dataclass(frozen=True)
class NodeShape:
    """``count`` nodes that each offer ``resources`` (a live node, or a node type at its max)."""

    name: str
    resources: Mapping[str, float]
    count: int = 1


@dataclass(frozen=True)
class ClusterCapacity:
    """The nodes a run can be placed on.

    ``bound`` is True when the nodes are the most the cluster will ever have (a fixed cluster,
    or a launcher YAML's maxima); False for the live nodes of an autoscaling cluster, which
    may grow.
    """

    nodes: tuple[NodeShape, ...]
    bound: bool
    source: str

    def total(self, resource: str) -> float:
        return sum(n.count * float(n.resources.get(resource, 0.0)) for n in self.nodes)


# ---------------------------------------------------------------------------------- reading


def is_bookkeeping(name: str) -> bool:
    return name in _BOOKKEEPING or name.startswith(_BOOKKEEPING[2:])


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    import requests

    from pipeline.cluster.job_client import JobServerError

    try:
        response = requests.get(url, timeout=(timeout, 3 * timeout))
        response.raise_for_status()
        return response.json()
    except (requests.exceptions.RequestException, ValueError) as exc:
        raise JobServerError(f"cannot read the cluster's nodes from {url} "
                             f"({type(exc).__name__}); pass --no-resource-check to submit "
                             "without this check") from None


def live_capacity(url: str, timeout: float = 5.0) -> ClusterCapacity:
    """The alive nodes of the cluster whose Job server is ``url``, and whether it autoscales.

    Raises:
        JobServerError: the dashboard does not answer the state API.
    """
    body = _get_json(f"{url}/api/v0/nodes?detail=1&limit=10000", timeout)
    rows = body.get("data", {}).get("result", {}).get("result", [])
    nodes = []
    for row in rows:
        if row.get("state") != "ALIVE":
            continue
        resources = {k: float(v) for k, v in (row.get("resources_total") or {}).items()
                     if not is_bookkeeping(k)}
        nodes.append(NodeShape(str(row.get("node_id", "?"))[:8], resources))
    status = _get_json(f"{url}/api/cluster_status", timeout).get("data", {})
    autoscaling = reports_autoscaling(status.get("clusterStatus") or {})
    source = (f"the nodes up now at {url}, an autoscaling cluster" if autoscaling
              else f"the nodes alive at {url}")
    return ClusterCapacity(tuple(nodes), bound=not autoscaling, source=source)


def reports_autoscaling(cluster_status: Mapping[str, Any]) -> bool:
    """Whether the autoscaler's report (``/api/cluster_status``) is that of a cluster that
    can grow: named node types or launches under way. A fixed cluster (``ray start`` by hand,
    KubeRay without autoscaling) is reported by a read-only autoscaler whose node types are
    the nodes themselves (``node_<id>``)."""
    report = cluster_status.get("autoscalerReport") or {}
    if report.get("pendingLaunches") or report.get("pendingNodes"):
        return True
    types = (report.get("nodeTypeMapping") or {}).values()
    return any(not re.fullmatch(r"node_[0-9a-f]+", str(t)) for t in types)


def launcher_capacity(config: Mapping[str, Any] | str | Path) -> ClusterCapacity:
    """The largest cluster a Ray cluster launcher config can scale to.

    ``config`` is the YAML's content or its path. Each node type counts ``max_workers`` times
    (at most the global ``max_workers``); the head node type once more. Node types must list
    their ``resources`` (the launcher would otherwise ask the cloud for them).
    """
    where = "cluster config"
    if not isinstance(config, Mapping):
        import yaml

        path = Path(config)
        where = str(path)
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"--cluster-config {path}: {exc.strerror}") from None
        if not isinstance(config, Mapping):
            raise ConfigError(f"--cluster-config {path}: not a Ray cluster launcher YAML")
    types = config.get("available_node_types")
    if not isinstance(types, Mapping) or not types:
        raise ConfigError("cluster config: no available_node_types; give each node type its "
                          "resources and max_workers")
    global_max = int(config.get("max_workers", 0))
    head = config.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if not resources:
            raise ConfigError(f"cluster config: node type {name} lists no resources; write "
                              "them out (CPU, GPU and the bsgal_* pins)")
        count = min(int(spec.get("max_workers", global_max)), global_max)
        if name == head:
            count += 1
        if count > 0:
            nodes.append(NodeShape(str(name), resources, count))
    return ClusterCapacity(tuple(nodes), bound=True,
                           source=f"{where}, every node type at max_workers")


def autoscaler_max_resources(bootstrap_config: str | Path = "~/ray_bootstrap_config.yaml"
                             ) -> dict[str, float] | None:
    """Inside a cluster (a connected driver): the most of each resource the autoscaler may
    provide, or None when no autoscaler says so (``bsgal run`` checks a job against it).

    Asks Ray for the cluster config that an autoscaler reports to the GCS (KubeRay, autoscaler
    v2), then falls back to the launcher's bootstrap YAML on the head node.
    """
    try:
        import ray

        if ray.is_initialized():
            from ray._private.state import state

            found = state.get_max_resources_from_cluster_config()
            if found:
                return {k: float(v) for k, v in found.items()}
    except Exception:  # a private API: absent or changed means "not known"
        pass
    path = Path(bootstrap_config).expanduser()
    if not path.is_file():
        return None
    cap = launcher_capacity(path)
    names = {r for node in cap.nodes for r in node.resources}
    return {r: cap.total(r) for r in sorted(names)}


# ----------------------------------------------------------------------------------- demand


def units_that_fit(unit: Mapping[str, float], cap: ClusterCapacity) -> int:
    """How many copies of ``unit`` the nodes hold, each copy on one node (no other load)."""
    if not unit:
        raise ValueError("an empty request fits anywhere; leave it out")
    return sum(node.count * min(math.floor(float(node.resources.get(r, 0.0)) / need + 1e-9)
                                for r, need in unit.items())
               for node in cap.nodes)


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def check_capacity(cfg: RunConfig, cap: ClusterCapacity) -> list[str]:
    """Raise :class:`ConfigError` when the run cannot be placed on ``cap``; else warnings.

    On a bound capacity every shortfall is an error. On the live nodes of an autoscaling
    cluster shortfalls are warnings (the autoscaler may add nodes; pass the launcher YAML to
    know its maximum).
    """
    problems: list[str] = []
    try:
        check_fits(cfg, cap.total("CPU"), cap.total("GPU"))
    except ConfigError as exc:
        problems.append(str(exc))
    requests = [r for r in run_requests(cfg) if r.count > 0 and r.unit]
    custom = sorted({k for r in requests for k in r.unit} - {"CPU", "GPU"})
    for name in custom:
        parts = {r.part: r.count * r.unit[name] for r in requests if name in r.unit}
        need, have = sum(parts.values()), cap.total(name)
        if need > have + 1e-9:
            detail = ", ".join(f"{p} {v:g}" for p, v in parts.items())
            problems.append(f"the job asks for {need:g} of the custom resource {name} "
                            f"({detail}) but the cluster offers {have:g}; advertise it on "
                            "the node type meant for that stage (deploy/cluster.yaml) or "
                            "clear the stage's resources key")
    for req in requests:
        fit = units_that_fit(req.unit, cap)
        if fit < req.count:
            shapes = "; ".join(f"{n.name} x{n.count} {_fmt(n.resources)}" for n in cap.nodes)
            problems.append(f"{req.part}: {req.count} x {_fmt(req.unit)} must each fit on one "
                            f"node, but the nodes hold {fit} ({req.keys}); nodes: {shapes}")
    if not problems:
        return []
    if cap.bound:
        raise ConfigError(f"the job does not fit the cluster ({cap.source}):\n  - "
                          + "\n  - ".join(problems))
    return [f"{p} (the autoscaler may add nodes; give --cluster-config to check against its "
            "maximum)" for p in problems]

"""What a run asks of Ray: the one model of its resource demand (config only, no Ray).

:func:`run_requests` lists every part that holds resources while the job runs — the three
stage actor pools and the trainer workers — as ``count`` copies of a per-unit request
(CPU, GPU and custom resources that pin a part to a node type). Everything else is derived
from it: :func:`stage_cpus` (the CPUs the Ray Data pools hold, the floor of Ray Data's CPU
budget), :func:`check_fits` (CPU/GPU totals against a cluster's, used by ``bsgal run`` once
connected and by ``bsgal submit`` before sending), and the per-node placement check of
:mod:`pipeline.cluster.capacity`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import POOL_BACKEND, ConfigError, RunConfig

#: The parts that are Ray Data stage pools (the rest is training).
STAGE_PARTS = ("generation", "annotation", "quality checks")


@dataclass(frozen=True)
class ResourceRequest:
    """``count`` units of ``unit`` (resource → amount), each placed on one node.

    ``count_key``, ``cpu_key``, ``gpu_key`` and ``custom_key`` are the config keys that set the
    count and each amount (for messages that say what to lower).
    """

    part: str
    unit: Mapping[str, float]
    count: int
    count_key: str
    cpu_key: str
    gpu_key: str
    custom_key: str | None = None

    @property
    def keys(self) -> str:
        """The config keys of this part, e.g. ``generation.concurrency, num_cpus, num_gpus``."""
        names = [self.count_key] + [k.split(".", 1)[1] for k in (self.cpu_key, self.gpu_key,
                                                                    self.custom_key) if k]
        return ", ".join(dict.fromkeys(names))

    def total(self, resource: str) -> float:
        """What all ``count`` units hold of ``resource``."""
        return self.count * float(self.unit.get(resource, 0.0))

    def key_of(self, resource: str) -> str:
        """How the config sets the total of ``resource`` (``CPU`` or ``GPU``)."""
        key = self.cpu_key if resource == "CPU" else self.gpu_key
        if key == "training.use_gpu":
            return f"{self.count_key} (training.use_gpu=true)"
        return f"{self.count_key} x {key}"


def _unit(cpus: float, gpus: float, custom: Mapping[str, float] | None = None
          ) -> dict[str, float]:
    out = {"CPU": float(cpus), "GPU": float(gpus)}
    out.update({k: float(v) for k, v in (custom or {}).items()})
    return {k: v for k, v in out.items() if v > 0}


def run_requests(cfg: RunConfig) -> list[ResourceRequest]:
    """Each stage pool and the trainer workers as counts of per-unit resource requests (a run
    over a pool has no annotation stage, unless its images still need masks: the pool reader
    stands where generation is)."""
    g, a, t = cfg.generation, cfg.annotation, cfg.training
    requests = [
        ResourceRequest("generation", _unit(g.num_cpus, g.num_gpus, g.resources),
                        g.concurrency, "generation.concurrency", "generation.num_cpus",
                        "generation.num_gpus", "generation.resources"),
        ResourceRequest("annotation", _unit(a.num_cpus, a.num_gpus, a.resources),
                        a.concurrency, "annotation.concurrency", "annotation.num_cpus",
                        "annotation.num_gpus", "annotation.resources"),
        ResourceRequest("quality checks", _unit(a.check_num_cpus, a.check_num_gpus),
                        a.check_concurrency, "annotation.check_concurrency",
                        "annotation.check_num_cpus", "annotation.check_num_gpus"),
        ResourceRequest("training", _unit(t.num_cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                                          t.resources_per_worker),
                        t.num_workers, "training.num_workers", "training.num_cpus_per_worker",
                        "training.use_gpu", "training.resources_per_worker"),
    ]
    if not stages_annotate(cfg):
        requests = [r for r in requests if r.part != "annotation"]
    return requests


def stages_annotate(cfg: RunConfig) -> bool:
    """Whether the candidate stream has an annotation stage: online generation does; a pool
    only when its entries still need masks (`pipeline.storage.pool_index.PoolFormat`)."""
    if cfg.generation.backend != POOL_BACKEND:
        return True
    from pipeline.storage.pool_index import needs_masks

    return needs_masks(cfg.generation.pool_format)


def stage_cpus(cfg: RunConfig) -> float:
    """CPUs the stage actor pools hold at once (each pool at its fixed size)."""
    return sum(r.total("CPU") for r in run_requests(cfg) if r.part in STAGE_PARTS)


def check_fits(cfg: RunConfig, cpus: float, gpus: float) -> None:
    """Raise :class:`ConfigError` when the stage pools and trainer workers need more CPUs or
    GPUs than the cluster has (message: what each part asks for and which keys to lower)."""
    requests = run_requests(cfg)
    for resource, have, unit in (("GPU", gpus, "GPUs"), ("CPU", cpus, "CPUs")):
        parts = [(r, r.total(resource)) for r in requests if r.total(resource) > 0]
        total = sum(v for _, v in parts)
        if total <= have + 1e-9:
            continue
        detail = ", ".join(f"{r.key_of(resource)} = {v:g}" for r, v in parts)
        if resource == "GPU" and have == 0:
            hint = ("this Ray cluster has no GPU: set the num_gpus keys to 0 and "
                    "training.use_gpu=false, or connect to a cluster with GPUs (ray.address)")
        else:
            hint = ("lower these (fractions such as num_cpus=0.25 suit light stages) or use a "
                    "larger cluster (ray.address)")
        raise ConfigError(f"the job needs {total:g} {unit} at once but the Ray cluster has "
                          f"{have:g} ({detail}); {hint}")

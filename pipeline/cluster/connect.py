"""Reaching Ray (a local instance or an existing cluster) and checking that the job fits it.

``connect(cfg)`` uses a Ray that this process already initialised (tests share one), connects to
``ray.address`` when it is set, or starts a local instance; it says whether it started Ray, so
that the job shuts down only what it started; ``max_cpus``/``max_gpus`` of the connection are
what :func:`pipeline.demand.check_fits` checks the job against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.config import ConfigError, RunConfig
from pipeline.paths import code_root


@dataclass(frozen=True)
class RayConnection:
    """How this job reached Ray: ``started`` when it started a local instance itself.

    ``cpus``/``gpus`` are what the cluster holds now; ``max_cpus``/``max_gpus`` what it may
    grow to (an autoscaler's node types at their ``max_workers``), the same when none reports.
    """

    started: bool
    address: str
    cpus: float
    gpus: float
    max_cpus: float
    max_gpus: float


def worker_env() -> dict[str, str]:
    """Environment for local Ray workers: this code first on PYTHONPATH, one BLAS/OpenMP thread
    per process unless set (the trainer sets its torch thread count itself)."""
    path = os.environ.get("PYTHONPATH", "")
    parts = [code_root()] + [p for p in path.split(os.pathsep) if p and p != code_root()]
    return {"PYTHONPATH": os.pathsep.join(parts),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def start_local_ray(num_cpus: int | None = None, object_store_memory_mb: int | None = None,
                    log_to_driver: bool = False) -> None:
    """``ray.init`` of a local instance whose workers import this code (see :func:`worker_env`).

    The environment is set in this process before Ray starts, because local workers inherit
    the environment of the processes that start them.
    """
    import ray

    os.environ.update(worker_env())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             object_store_memory=(object_store_memory_mb * 2**20
                                  if object_store_memory_mb else None),
             configure_logging=True, logging_level="WARNING")


def connect(cfg: RunConfig) -> RayConnection:
    """Use the Ray already initialised here, connect to ``cfg.ray.address``, or start one."""
    import ray

    started = False
    if not ray.is_initialized():
        if cfg.ray.address:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                ray.init(address=cfg.ray.address, log_to_driver=cfg.ray.log_to_driver,
                         logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"ray.address: cannot connect to Ray at {cfg.ray.address!r} "
                                  f"({exc}); start the cluster or fix the address") from None
        else:
            start_local_ray(cfg.ray.num_cpus, cfg.ray.object_store_memory_mb,
                            cfg.ray.log_to_driver)
            started = True
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    max_cpus, max_gpus = cpus, gpus
    if not started:
        # A cluster autoscaled from zero workers holds almost nothing until the job asks.
        from pipeline.cluster.capacity import autoscaler_max_resources

        limits = autoscaler_max_resources() or {}
        max_cpus = max(cpus, float(limits.get("CPU", 0.0)))
        max_gpus = max(gpus, float(limits.get("GPU", 0.0)))
    ctx = ray.get_runtime_context()
    return RayConnection(started=started, address=str(ctx.gcs_address), cpus=cpus, gpus=gpus,
                         max_cpus=max_cpus, max_gpus=max_gpus)

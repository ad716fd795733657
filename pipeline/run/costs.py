"""What each candidate cost, per stage, in device-seconds (the shard's ``cost_*`` columns).

A stage's cost of a row is its busy wall time for the row (the ``_seconds_<stage>`` column
:class:`pipeline.run.graph.TimedStage` adds: the batch's time divided by its rows; the
trainer's ``score_seconds`` / ``train_seconds`` share of its step) times the devices the stage
holds: its GPUs where it holds any (GPU-s), else its CPUs (CPU-s). So 0.2 s on an actor with
``num_gpus: 1`` is 0.2 GPU-s, and 0.2 s on a trainer worker with 2 CPUs is 0.4 CPU-s.

Stages: ``generate`` (the generator, or a pool's reader in its place), ``annotate``,
``check``, ``score`` (the BSGAL scoring of the candidate: instance level only, see
`trainer.loop`), ``train`` (pasting, the training pass and the optimizer step, shared by the
step's candidates). A stage a row never went through costs 0. ``cost_units`` names each
stage's unit (``generate=CPU,annotate=CPU,...``), so the shards alone say what the numbers
mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import RunConfig
from pipeline.storage.row_names import (
    COST_STAGES,
    TRAINER_SECONDS,
    cost_column,
    timing_column,
)


def _held(gpus: float, cpus: float) -> tuple[str, float]:
    return ("GPU", float(gpus)) if gpus and gpus > 0 else ("CPU", float(max(cpus, 0.0)))


def stage_devices(cfg: RunConfig, trainer_on_gpu: bool) -> dict[str, tuple[str, float]]:
    """Per stage, ``(unit, devices held)`` under ``cfg`` (the trainer's from its device)."""
    g, a, t = cfg.generation, cfg.annotation, cfg.training
    trainer = ("GPU", 1.0) if trainer_on_gpu else ("CPU", float(t.num_cpus_per_worker))
    return {"generate": _held(g.num_gpus, g.num_cpus),
            "annotate": _held(a.num_gpus, a.num_cpus),
            "check": _held(a.check_num_gpus, a.check_num_cpus),
            "score": trainer, "train": trainer}


def units_text(devices: Mapping[str, tuple[str, float]]) -> str:
    return ",".join(f"{s}={devices[s][0]}" for s in COST_STAGES)


def row_costs(row: Mapping[str, Any], trainer: Sequence[float] | None,
              devices: Mapping[str, tuple[str, float]], units: str) -> dict[str, Any]:
    """The ``cost_*`` fields of one decision row: ``row`` holds the stage timings
    (``_seconds_<stage>``; for ``bsgal rescore`` also ``_seconds_score``), ``trainer`` the
    trainer's (scoring, training) seconds of the row, or None."""
    out: dict[str, Any] = {"cost_units": units}
    for stage in COST_STAGES:
        seconds = row.get(timing_column(stage))
        if seconds is None and stage in TRAINER_SECONDS and trainer is not None:
            seconds = trainer[TRAINER_SECONDS[stage]]
        out[cost_column(stage)] = float(seconds or 0.0) * devices[stage][1]
    return out

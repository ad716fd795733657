"""The Ray Data graph: prompt rows → generate → annotate → quality checks.

See docs/architecture.md, Data flow.

Each stage is a ``map_batches`` over an actor pool whose size, ``num_cpus``/``num_gpus`` and
batch size come from the config; the model is loaded once per actor. The source is a table of
prompt rows built on the driver (``ray.data.from_arrow``), not a read task: on a small machine a
read task waits for a CPU that the stage actors and the Ray Train worker already hold (Ray Data
backpressures it forever), while an in-memory source needs no task at all. Prompt rows are
small (ids, text, seeds), so even 10⁶ of them fit easily; images only exist downstream.

Every stage runs inside a :class:`TimedStage`, which adds one float32 column per stage,
``_seconds_<stage>``: the stage's busy time for the row's batch divided by the batch's rows
(seconds per row). The trainer sums these to report each stage's throughput; the shard writer
ignores them. A stage actor that dies is restarted and its batch retried by Ray Data
(``max_restarts``/``max_task_retries``); stages never raise on a bad row, they mark it
``invalid_*``, so every prompt row reaches the trainer exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annotators import build_annotator_stage
from generators import build_generator_stage
from pipeline.config import POOL_BACKEND, RunConfig, rows_in_flight
from pipeline.demand import stage_cpus, stages_annotate
from pipeline.storage.row_names import timing_column


@dataclass(frozen=True)
class StageKill:
    """Test hook: the first actor of ``stage`` that sees ``sample_id`` in a batch exits
    (``os._exit(1)``, as a crash would), once; ``marker`` (a file path) records that it did."""

    stage: str
    sample_id: str
    marker: str


@dataclass(frozen=True)
class StageSpec:
    """One ``map_batches`` stage: what to build in each actor and with which resources."""

    name: str
    build: Callable[..., Any]
    kwargs: dict[str, Any]
    batch_size: int
    concurrency: int
    num_cpus: float
    num_gpus: float
    # Custom Ray resources per actor (pins the pool to a node type); empty: none.
    resources: Mapping[str, float] = field(default_factory=dict)


class StageError(RuntimeError):
    """A stage failed on a batch: the message names the stage, the batch and the cause (the
    driver's one line says this instead of "training failed")."""


class TimedStage:
    """Ray Data stage wrapper: builds the real stage once, times each batch.

    Output: the wrapped stage's columns plus ``_seconds_<name>`` (float32 [B], busy seconds per
    row of this batch). Reports rows done to the progress board (fire-and-forget) when given.
    """

    def __init__(self, name: str, build: Callable[..., Any], kwargs: Mapping[str, Any],
                 progress: Any = None, kill: StageKill | None = None) -> None:
        self.name = name
        if progress is not None:  # before the build: loading a model may warn too
            from pipeline.run.progress import forward_warnings

            forward_warnings(progress, f"{name} stage")
        self.stage = build(**kwargs)
        self.column = timing_column(name)
        self.progress = progress
        self.kill = kill if kill is not None and kill.stage == name else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kill is not None and self.kill.sample_id in set(batch["sample_id"]):
            if not os.path.exists(self.kill.marker):
                with open(self.kill.marker, "w") as fh:
                    fh.write(f"{self.name} pid {os.getpid()}\n")
                os._exit(1)
        started = time.perf_counter()
        try:
            out = self.stage(batch)
        except Exception as exc:
            ids = [str(x) for x in batch.get("sample_id", [])]
            which = (f"{len(ids)} candidates, {ids[0]} .. {ids[-1]}" if ids else "an empty batch")
            cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise StageError(f"the {self.name} stage failed on a batch of {which}: "
                             f"{type(exc).__name__}: {cause}") from exc
        # A stage may wait without working (the closed loop's read-ahead bound): not busy.
        seconds = time.perf_counter() - started - getattr(self.stage, "idle_seconds", 0.0)
        n = len(out["sample_id"])
        out[self.column] = np.full(n, seconds / max(n, 1), dtype=np.float32)
        if self.progress is not None:
            self.progress.stage_done.remote(self.name, n, seconds)
        return out


def _build_quality_check(section: Mapping[str, Any]) -> Any:
    from annotators.quality import build_quality_check

    return build_quality_check(section)


def _build_pool_reader(**kwargs: Any) -> Any:
    from pipeline.run.pool_stage import PoolReader

    return PoolReader(**kwargs)


def stage_specs(cfg: RunConfig, categories: Sequence[Mapping[str, Any]]) -> list[StageSpec]:
    """The stages of ``cfg`` (docs/contracts.md, Candidate): each backend builds its stage
    from its config section (``build(section)`` beside its code), inside the actor.

    Online: generate, annotate, check. From a pool (``generation.backend: pool``, the other
    source): the pool reader stands in the ``generate`` place and the entries bring their
    masks, so there is no annotation stage unless the pool's format needs one (plain images
    that the annotator cuts out), then the same checks.
    """
    g, a = cfg.generation, cfg.annotation
    if g.backend == POOL_BACKEND:
        source = StageSpec("generate", _build_pool_reader,
                           {"image_size": g.image_size, "fill": g.pool_fill,
                            "storage_options": dict(g.pool_storage_options)},
                           g.batch_size, g.concurrency, g.num_cpus, g.num_gpus, dict(g.resources))
    else:
        source = StageSpec("generate", build_generator_stage,
                           {"backend": g.backend, "section": dataclasses.asdict(g),
                            "categories": list(categories)},
                           g.batch_size, g.concurrency, g.num_cpus, g.num_gpus, dict(g.resources))
    specs = [source]
    if stages_annotate(cfg):
        specs.append(StageSpec("annotate", build_annotator_stage,
                               {"backend": a.backend, "section": dataclasses.asdict(a)},
                               a.batch_size, a.concurrency, a.num_cpus, a.num_gpus,
                               dict(a.resources)))
    specs.append(StageSpec("check", _build_quality_check, {"section": dataclasses.asdict(a)},
                           a.check_batch_size, a.check_concurrency, a.check_num_cpus,
                           a.check_num_gpus))
    return specs


def _build_steered(**kwargs: Any) -> Any:
    from pipeline.run.steering import SteeredGeneration

    return SteeredGeneration(**kwargs)


def max_ahead(cfg: RunConfig) -> int:
    """Candidates generation may run ahead of the decisions in a closed-loop run:
    ``feedback.max_ahead``, or (0) twice what the stages' batches and the trainers' batches in
    hand and prefetched hold, so that every stage can always fill its next batch."""
    if cfg.feedback.max_ahead:
        return int(cfg.feedback.max_ahead)
    return 2 * rows_in_flight(cfg)


def steered_specs(cfg: RunConfig, categories: Sequence[Mapping[str, Any]],
                  specs: Sequence[StageSpec], demand: Any) -> list[StageSpec]:
    """``specs`` with the generate stage drawing its prompts from the demand actor
    (:mod:`pipeline.run.steering`)."""
    import functools

    from pipeline.run.steering import online_sampler

    out = []
    for spec in specs:
        if spec.name == "generate":
            kwargs = {"sampler": functools.partial(online_sampler, cfg, list(categories)),
                      "generator": functools.partial(spec.build, **spec.kwargs),
                      "board": demand, "timeout_s": cfg.feedback.timeout_s,
                      "max_ahead": max_ahead(cfg), "max_wait_s": cfg.feedback.max_wait_s}
            spec = dataclasses.replace(spec, build=_build_steered, kwargs=kwargs)
        out.append(spec)
    return out


def prompt_blocks(prompts: Mapping[str, np.ndarray], block_rows: int) -> list[Any]:
    """Prompt columns (``PromptSampler.sample_batch`` output) as Arrow tables of
    ``block_rows`` rows each: the source blocks of the graph, in stream order."""
    import pyarrow as pa

    n = len(prompts["sample_id"])
    table = pa.table({k: (list(v) if v.dtype == object else v) for k, v in prompts.items()})
    if n == 0:
        return [table]
    return [table.slice(i, block_rows) for i in range(0, n, block_rows)]


def build_candidate_dataset(cfg: RunConfig, prompts: Mapping[str, np.ndarray],
                            categories: Sequence[Mapping[str, Any]], progress: Any = None,
                            kill: StageKill | None = None,
                            specs: Sequence[StageSpec] | None = None,
                            demand: Any = None) -> Any:
    """The candidate stream as a lazy ``ray.data.Dataset`` (nothing runs until it is read).

    Args:
        cfg: the run config (stage sections and ``ray``).
        prompts: the prompt rows still to generate, in stream order (numpy columns).
        categories: the training set's LVIS category dicts (the procedural generator draws
            each class's ``look``; loaded once on the driver).
        progress: the run's :class:`pipeline.run.progress.ProgressBoard` actor, or None.
        kill: test hook, see :class:`StageKill`.
        specs: the stages (default :func:`stage_specs` of ``cfg``); benchmarks swap one.
        demand: the run's demand actor (closed loop: :func:`steered_specs`), or None.
    """
    import ray

    specs = list(specs) if specs is not None else stage_specs(cfg, categories)
    if demand is not None:
        specs = steered_specs(cfg, categories, specs, demand)
    # Ray Data restarts dead stage actors and retries their batches without limit by default;
    # other limits are passed on (as the older remote-args keywords, the only way to set them).
    retries = {k: v for k, v in (("max_restarts", cfg.ray.max_restarts),
                                 ("max_task_retries", cfg.ray.max_task_retries)) if v != -1}
    ds = ray.data.from_arrow(prompt_blocks(prompts, specs[0].batch_size))
    for spec in specs:
        ds = ds.map_batches(
            TimedStage,
            fn_constructor_kwargs={"name": spec.name, "build": spec.build, "kwargs": spec.kwargs,
                                   "progress": progress, "kill": kill},
            compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
            batch_size=spec.batch_size,
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus or None,
            resources=dict(spec.resources) or None,
            batch_format="numpy",
            zero_copy_batch=True,
            **retries,
        )
    return ds


class _DropChosenSettings(logging.Filter):
    """Ray Data's notice that progress bars are off: bsgal turned them off on purpose
    (``ray.data_progress_bars``) and draws its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO lines (execution plans, "Starting execution of Dataset ...") stay in
    its log files (``/tmp/ray/session_*/logs/ray-data``) instead of this console; its
    warnings still show, except the one about a setting bsgal chose."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler" or (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)):
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropChosenSettings) for f in handler.filters):
                handler.addFilter(_DropChosenSettings())


def configure_data_context(cfg: RunConfig, cluster_cpus: float) -> None:
    """Ray Data options of the driver's context, which the dataset carries to its executor:
    stream order, progress bars, and the CPU budget (``ray.data_cpu_fraction`` of the
    cluster's CPUs)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    quiet_ray_data_logs()  # after ray.data's import, which sets up its loggers
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.enable_progress_bars = cfg.ray.data_progress_bars
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        cpu=max(cfg.ray.data_cpu_fraction * cluster_cpus, stage_cpus(cfg)))

"""A whole run: checks, data, the Ray Data graph into a Ray Train trainer, summary.

``run_job(cfg)`` is what ``bsgal run`` and ``bsgal demo`` call; ``resume_job(out)`` is
``bsgal run --resume OUT``. In order:

1. the output storage is probed (write, read back, delete) before anything else, so that an
   unreachable bucket fails in seconds with one clear line;
2. the built-in data set is written if the config asks for it and it is missing;
3. the resolved config goes to ``OUT/config.yaml`` with credentials redacted;
4. Ray is reached (an existing instance, ``ray.address``, or a local one) and the stage pools
   plus trainer workers are checked against its CPUs/GPUs;
5. the prompt rows still to generate become the source of the Ray Data graph
   (:mod:`pipeline.run.graph`), which a ``TorchTrainer`` reads through
   ``ray.train.get_dataset_shard`` (:mod:`pipeline.run.train_worker`);
6. ``OUT/summary.json`` gets the counts (made = accepted + rejected + invalid), acceptance by
   frequency group, the final evaluation and the timings.

Resume: the latest checkpoint says how far each worker got in its candidate stream; shard files
written after it are removed (:func:`pipeline.storage.shards.drop_after`) and the prompt rows
not yet decided are generated again. With one worker and ``ray.preserve_order`` the resumed run's
decisions equal an uninterrupted run's; with N workers the split of the stream between workers
depends on timing, so a resumed run decides every remaining candidate exactly once but not
necessarily on the same worker.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from generators.columns import STREAM_POSITION
from pipeline.config import ConfigError, RunConfig, config_to_dict, feedback_settings
from pipeline.errors import UserError
from pipeline.paths import absolute_paths
from pipeline.run.graph import StageKill
from pipeline.storage.checkpoints import newest_readable_checkpoint, read_info
from pipeline.storage.filesystem import StorageError, fast_fail_options
from pipeline.storage.run_config import resume_config, write_run_config
from pipeline.storage.run_dir import MetricsLog, RunDir, remove_failed_start
from pipeline.storage.shard_writer import preflight_writable
from pipeline.storage.shards import drop_after, read_decisions


class TrainingFailed(UserError, RuntimeError):
    """The Ray Train workers failed; the message is one line naming the worker's error."""


class PlacementTimedOut(UserError):
    """Stage actors or train workers waited longer than ``ray.placement_timeout_s`` for a
    node; the run stopped at a checkpoint and can be resumed."""

    exit_code = 75  # EX_TEMPFAIL: try again once the cluster has the node


class Interrupted(UserError):
    """SIGINT/SIGTERM stopped the run after its checkpoint was written.

    Attributes:
        signum: the signal; ``exit_code`` is 128 + signum, as a shell reports it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def _flush_stdio() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class StopOnSignal:
    """Context manager: the first SIGINT/SIGTERM asks the trainer ranks (through the progress
    board) to finish their candidate batch, checkpoint and end; a second one exits at once.

    Only the main thread can install signal handlers; elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, board: Any, echo: Callable[[str], None], keeper: Any = None) -> None:
        self.board = board
        self.echo = echo
        self.keeper = keeper  # a PlacementWatch: asks again should the board restart
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.echo("second interrupt: exiting now (resume from the last checkpoint)")
            _flush_stdio()
            os._exit(128 + signum)  # at once: no waiting on Ray's shutdown
        self.signum = signum
        if self.keeper is not None:
            self.keeper.request_stop(signal.Signals(signum).name)
        else:
            self.board.request_stop.remote(signal.Signals(signum).name)
        self.echo(f"\n{signal.Signals(signum).name}: finishing the current candidate batch, "
                  "then writing a checkpoint and the pending decision rows (again to exit at "
                  "once)")
        _flush_stdio()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass(frozen=True)
class Faults:
    """Test hooks that make a run fail the way a real one can (never set by the CLI).

    Attributes:
        kill_stage: a stage actor exits once on a given candidate (Ray Data restarts it and
            retries the batch).
        crash_at_step: the rank-0 train worker flushes its shards and exits (no checkpoint)
            once it reaches this step.
        kill_demand_at_step: the rank-0 train worker kills the closed loop's demand actor
            once it reaches this step.
    """

    kill_stage: StageKill | None = None
    crash_at_step: int | None = None
    kill_demand_at_step: int | None = None


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpoint, and the stream positions still to make."""

    checkpoint: str | None
    step: int
    positions: np.ndarray
    decided: int
    dropped_files: int
    #: newer checkpoints that could not be read and were set aside (one line each)
    set_aside: tuple[str, ...] = ()


@dataclasses.dataclass
class JobResult:
    """What a finished run reports (also written as ``OUT/summary.json``)."""

    out: str
    summary: dict[str, Any]


# ------------------------------------------------------------------------------ prompts


def prompt_sampler(cfg: RunConfig, categories: Sequence[dict[str, Any]]) -> Any:
    """The run's deterministic prompt stream (row i depends only on seed, run name and i);
    with ``generation.backend: pool`` the draws from the pool
    (:class:`pipeline.run.pool_source.PoolDraws`, the same interface)."""
    from pipeline.run.steering import online_sampler

    if cfg.generation.backend == "pool":
        from pipeline.run.pool_source import pool_draws

        return pool_draws(cfg, categories)
    return online_sampler(cfg, categories)


# ------------------------------------------------------------------------------ resume


def plan_resume(cfg: RunConfig, sampler: Any) -> ResumePoint:
    """Find the latest checkpoint of ``cfg.output.dir``, drop the shard files written after it
    and list the stream positions whose candidates have no decision row yet."""
    out, opts = cfg.output.dir, cfg.output.storage_options
    run = RunDir(out, opts)
    run.fs.invalidate_cache()  # other processes wrote the run: list it afresh
    name, set_aside = newest_readable_checkpoint(run)
    n = cfg.generation.num_candidates
    if name is None:
        offsets = [0] * cfg.training.num_workers
        step = 0
    else:
        info = read_info(run, name)
        if info["world_size"] != cfg.training.num_workers:
            raise ConfigError(f"training.num_workers: {out} was run with "
                              f"{info['world_size']} workers; resume it with as many")
        offsets = [int(r["stream_offset"]) for r in info["ranks"]]
        step = int(info["step"])
    dropped = 0
    for rank, offset in enumerate(offsets):
        dropped += len(drop_after(out, rank, offset, opts))
    decided = sum(offsets)
    if decided == 0:
        return ResumePoint(name, step, np.arange(n, dtype=np.int64), 0, dropped,
                           tuple(set_aside))
    ids = read_decisions(out, columns=["sample_id"], storage_options=opts).column(
        "sample_id").to_pylist()
    if len(ids) != decided or len(set(ids)) != len(ids):
        raise StorageError(
            f"{out}: the shards hold {len(ids)} decision rows ({len(set(ids))} distinct) but "
            f"checkpoint {name} says {decided} candidates were decided; the run folder was "
            "changed by hand or written by two runs at once")
    if feedback_settings(cfg).closed:
        # Closed loop: a row's class and prompt depend on the allocation it was drawn with,
        # so the decided rows are found by their stream positions, not their ids.
        done = set(read_decisions(out, columns=["stream_position"], storage_options=opts)
                   .column("stream_position").to_pylist())
        positions = np.array([i for i in range(n) if i not in done], dtype=np.int64)
    elif len(offsets) == 1:
        # One worker, stream in order: positions 0..offset-1 are exactly the decided ones.
        positions = np.arange(offsets[0], n, dtype=np.int64)
        expected = sampler.sample_batch(offsets[0])["sample_id"]
        if sorted(expected) != sorted(ids):
            raise StorageError(f"{out}: the decided candidates are not the first {decided} of "
                               "this config's prompt stream (different run name or seed?)")
    else:
        done = set(ids)
        every = sampler.sample_batch(n)["sample_id"]
        positions = np.array([i for i, sid in enumerate(every) if sid not in done],
                             dtype=np.int64)
    return ResumePoint(name, step, positions, decided, dropped, tuple(set_aside))


# ------------------------------------------------------------------------------ the run


def cluster_capacity(cfg: RunConfig) -> Any:
    """Connect to ``cfg.ray.address`` and return what ``bsgal check`` judges the job against
    (:class:`pipeline.cluster.nodes.ClusterFacts`: the nodes, or the autoscaler's node types
    at their maximum, and whether every train node sees ``output.dir``); disconnects again."""
    import ray

    from pipeline.cluster.connect import connect
    from pipeline.cluster.nodes import cluster_facts

    already = ray.is_initialized()
    conn = connect(cfg)
    try:
        return cluster_facts(cfg, shared_output=not conn.started)
    finally:
        if not already:
            ray.shutdown()


def _worker_error_line(exc: BaseException) -> str:
    """The last meaningful line of a worker traceback (``SomeError: message``)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) or "Error(" in head:
            return line
    return lines[-1] if lines else type(exc).__name__


def run_job(cfg: RunConfig, *, resume: bool = False, progress: str = "auto",
            faults: Faults | None = None, echo: Callable[[str], None] = print) -> JobResult:
    """Run (or with ``resume`` continue) the job of ``cfg``; see the module docstring.

    Raises:
        StorageError: the output cannot be written (before anything starts).
        ConfigError: a bad config, a job that does not fit the cluster, an existing run.
        TrainingFailed: a worker failed (one line naming its error).
    """
    from pipeline.run.preflight import preflight

    started = time.monotonic()
    faults = faults or Faults()
    # Ray workers run in folders of their own: relative paths would land (or be looked for)
    # there, not where the user ran the command.
    cfg = absolute_paths(cfg, Path.cwd())
    out, opts = cfg.output.dir.rstrip("/"), cfg.output.storage_options
    if cfg.selection.method == "none" and cfg.generation.num_candidates > 0:
        raise ConfigError("selection.method=none trains on real data only; set "
                          "generation.num_candidates=0 (or choose a selection method)")
    report = preflight(cfg, resume=resume)
    for warning in report.warnings:
        echo(f"warning: {warning}")
    report.raise_if_problems()
    run = RunDir(out, opts)
    seen: dict[str, int] = {"decided": 0}
    try:
        return _checked_run(cfg, run, resume, started, progress, faults, echo, seen)
    except BaseException:
        if not resume and seen["decided"] > 0 and not _rows_visible(run):
            # The trainers said they decided rows that this process cannot see: they wrote
            # them somewhere else. Deleting what is here would lose the only way back.
            echo(f"the trainers reported {seen['decided']} decided candidates but none is "
                 f"visible in {out}: everything there was kept (do all nodes write to the "
                 "same output.dir?)")
        elif not resume:
            try:
                removed = remove_failed_start(run)
            except Exception as exc:  # e.g. the store went away: keep the first error
                echo(f"the run stopped before its first checkpoint and what it wrote in {out} "
                     f"could not be removed ({type(exc).__name__}); retry it with "
                     f"`bsgal run --resume {out}`")
            else:
                if removed:
                    echo(f"the run stopped before its first checkpoint: nothing of it was kept "
                         f"in {out}; fix the problem and run the same command again")
        raise


def _rows_visible(run: RunDir) -> bool:
    try:
        run.fs.invalidate_cache()
        return run.exists("shards") and bool(run.fs.find(run.path_of("shards")))
    except Exception:  # noqa: BLE001 - unreadable counts as not visible: keep everything
        return False


def _checked_run(cfg: RunConfig, run: RunDir, resume: bool, started: float, progress: str,
                 faults: Faults, echo: Callable[[str], None],
                 seen: dict[str, int] | None = None) -> JobResult:
    """:func:`run_job` once its checks passed; ``seen["decided"]``: the candidates the
    trainers reported decided (kept up to date while training)."""
    from pipeline.run.datasets import ensure_builtin_data, train_categories

    out = run.out
    if ensure_builtin_data(cfg.data):
        echo(f"wrote the built-in data set to {cfg.data.root}")
    categories = train_categories(cfg.data)
    sampler = prompt_sampler(cfg, categories)
    if resume:
        point = plan_resume(cfg, sampler)
        for line in point.set_aside:
            echo(f"warning: checkpoint {line}; resuming from the newest one before it")
        if point.checkpoint is None:
            echo(f"resuming {out}: no checkpoint yet, starting over "
                 f"({point.dropped_files} shard files removed)")
        else:
            echo(f"resuming {out} from {point.checkpoint}: {point.decided} candidates decided, "
                 f"{len(point.positions)} to go ({point.dropped_files} shard files written "
                 "after the checkpoint removed)")
    else:
        write_run_config(run, cfg)
        point = ResumePoint(None, 0, np.arange(cfg.generation.num_candidates, dtype=np.int64),
                            0, 0)
    log = MetricsLog(run)
    log.log("job_start", step=point.step, resume=resume, checkpoint=point.checkpoint,
            candidates_to_make=len(point.positions), candidates_decided=point.decided)
    log.close()

    summary = _run_on_ray(cfg, categories, point, progress, faults, echo, sampler,
                          {} if seen is None else seen)
    summary["seconds"] = time.monotonic() - started
    run.write_json("summary.json", summary)
    log = MetricsLog(run)
    log.log("job_done", step=summary.get("final_step"), seconds=summary["seconds"])
    log.close()
    return JobResult(out=out, summary=summary)


def _prompts(sampler: Any, point: ResumePoint) -> dict[str, np.ndarray]:
    """The prompt rows still to make (with their stream positions)."""
    prompts = sampler.sample_positions(point.positions)
    prompts[STREAM_POSITION] = point.positions
    return prompts


#: Ray errors that mean a worker's process or node went away (not a bug in the worker's code):
#: the run restarts from its checkpoint for these, up to training.max_failures times.
NODE_LOSS_ERRORS = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError",
                    "WorkerCrashedError", "RayActorError", "OwnerDiedError", "ObjectLostError",
                    "LocalRayletDiedError", "ObjectFetchTimedOutError")
_NODE_LOSS_TEXT = ("is unavailable", "died unexpectedly", "has been marked dead",
                   "node has died", "SYSTEM_ERROR", "Failed to connect to remote host",
                   "worker died", "node was terminated")


def is_node_loss(exc: BaseException) -> bool:
    """Whether a failed ``fit`` failed because processes or nodes were lost (Ray's own
    errors, in the chain or in the text of Ray Train's wrapped worker error), rather than by
    an error the workers' code raised."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if any(c.__name__ in NODE_LOSS_ERRORS for c in type(err).__mro__):
            return True
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(f for f in failures.values() if isinstance(f, BaseException))
        for nxt in (err.__cause__, err.__context__):
            if nxt is not None:
                todo.append(nxt)
    text = str(exc)
    return any(name in text for name in NODE_LOSS_ERRORS + _NODE_LOSS_TEXT)


def _run_on_ray(cfg: RunConfig, categories: list[dict], point: ResumePoint, progress: str,
                faults: Faults, echo: Callable[[str], None], sampler: Any,
                seen: dict[str, int]) -> dict[str, Any]:
    """Connect, check the cluster (pins, shared output), then fit; when the train workers are
    lost, restart from the latest checkpoint (up to ``training.max_failures`` times)."""
    import ray

    from pipeline.cluster.capacity import check_capacity
    from pipeline.cluster.connect import connect
    from pipeline.cluster.nodes import connected_capacity, output_sharing_problem
    from pipeline.inspection.run_summary import summarize_run
    from pipeline.run.graph import configure_data_context
    from pipeline.run.progress import start_board

    t0 = time.monotonic()
    conn = connect(cfg)
    try:
        for warning in check_capacity(cfg, connected_capacity()):
            echo(f"warning: {warning}")
        if not conn.started:
            problem, notes = output_sharing_problem(cfg)
            if problem:
                raise ConfigError(problem)
            for note in notes:
                echo(f"note: {note}")
        ray_seconds = time.monotonic() - t0
        configure_data_context(cfg, conn.cpus)
        board = start_board()
        resumed_from = point.checkpoint
        restarts: list[dict[str, Any]] = []
        fit_seconds = 0.0
        while True:
            t_fit = time.monotonic()
            try:
                _fit_once(cfg, categories, point, progress, faults, echo, sampler, board, seen)
                fit_seconds += time.monotonic() - t_fit
                break
            except _NodeLost as lost:
                fit_seconds += time.monotonic() - t_fit
                attempt = len(restarts) + 1
                limit = cfg.training.max_failures
                where = "; ".join(lost.nodes) or "no node left the cluster: a worker process died"
                if attempt > limit:
                    raise TrainingFailed(
                        f"training failed: the train workers were lost ({where}): "
                        f"{lost.line}; training.max_failures={limit} restarts were "
                        f"{'used' if limit else 'allowed'}; resume with `bsgal run --resume "
                        f"{cfg.output.dir}`") from None
                point = plan_resume(cfg, sampler)
                echo(f"node lost ({where}): restarting from checkpoint step {point.step}, "
                     f"attempt {attempt} of {limit} ({point.decided} candidates decided, "
                     f"{len(point.positions)} to go)")
                restarts.append({"attempt": attempt, "step": point.step, "lost": lost.nodes,
                                 "error": lost.line, "decided": point.decided})
                log = MetricsLog(RunDir(cfg.output.dir, cfg.output.storage_options))
                log.log("restart", step=point.step, attempt=attempt, max_failures=limit,
                        lost=lost.nodes, error=lost.line)
                log.close()
                board.reset.remote()
                faults = dataclasses.replace(faults, crash_at_step=None)  # once only
        summary = summarize_run(cfg)
        summary["timings"] = {"ray_connect_seconds": ray_seconds, "fit_seconds": fit_seconds}
        summary["resumed_from"] = resumed_from
        summary["restarts"] = restarts
        return summary
    finally:
        if conn.started:
            ray.shutdown()


class _NodeLost(Exception):
    """A fit ended because its workers' processes or nodes went away."""

    def __init__(self, line: str, nodes: list[str]) -> None:
        super().__init__(line)
        self.line = line
        self.nodes = nodes


def _fit_once(cfg: RunConfig, categories: list[dict], point: ResumePoint, progress: str,
              faults: Faults, echo: Callable[[str], None], sampler: Any, board: Any,
              seen: dict[str, int]) -> None:
    """One Ray Train ``fit`` from ``point``: builds the stream of the positions still to make,
    watches placement, stops on signals.

    Raises:
        _NodeLost: the train workers were lost (the caller may restart).
        PlacementTimedOut, Interrupted, TrainingFailed: the run ends here.
    """
    import ray
    from ray.data import ExecutionOptions

    from pipeline.cluster.nodes import describe_nodes, live_nodes, lost_since
    from pipeline.cluster.placement import PlacementWatch
    from pipeline.run.graph import build_candidate_dataset
    from pipeline.run.progress import ProgressDisplay, TrainerTotals
    from pipeline.run.train_data_config import CandidateDataConfig
    from pipeline.run.train_worker import WorkerPlan

    demand = _demand_board(cfg, sampler, categories, point)
    ds = build_candidate_dataset(cfg, _prompts(sampler, point), categories, progress=board,
                                 kill=faults.kill_stage, demand=demand)
    ctx = ray.data.DataContext.get_current()
    options = ExecutionOptions(resource_limits=ctx.execution_options.resource_limits,
                               preserve_order=cfg.ray.preserve_order)
    plan = WorkerPlan(config=config_to_dict(cfg), out=cfg.output.dir,
                      resume_from=point.checkpoint, progress=board,
                      crash_at_step=faults.crash_at_step, demand=demand,
                      kill_demand_at_step=faults.kill_demand_at_step)
    watch = PlacementWatch(cfg, board, echo)
    trainer = _torch_trainer(cfg, plan, ds, CandidateDataConfig(options), watch)
    display = ProgressDisplay(board, candidates=cfg.generation.num_candidates,
                              steps=cfg.training.steps, mode=progress,
                              done_before=(point.decided, point.step))
    nodes = describe_nodes(live_nodes())
    with display, watch, StopOnSignal(board, echo, keeper=watch) as stopper:
        try:
            trainer.fit()
        except Exception as exc:  # Ray Train wraps worker errors; give one clear line
            if isinstance(exc, (ConfigError, StorageError)):
                raise
            if watch.timed_out is None and stopper.signum is None and is_node_loss(exc):
                time.sleep(2.0)  # the GCS marks a lost node dead within seconds
                raise _NodeLost(_worker_error_line(exc), lost_since(nodes)) from None
            if watch.timed_out is None:
                line = _worker_error_line(exc)
                if "StageError: " in line:  # a stage, not the trainer: say which and where
                    line = line.split("StageError: ", 1)[1]
                    raise TrainingFailed(f"{line} (worker logs: set ray.log_to_driver=true to "
                                         "see them here)") from None
                raise TrainingFailed(f"training failed: {line} (worker "
                                     "logs: set ray.log_to_driver=true to see them here)"
                                     ) from None
        finally:
            try:
                snap = ray.get(board.snapshot.remote(), timeout=5)
                seen["decided"] = max(seen.get("decided", 0),
                                      TrainerTotals.of(snap["ranks"]).decided)
            except Exception:  # noqa: BLE001 - the board is away: keep what was seen
                pass
    if stopper.signum is not None or watch.timed_out is not None:
        run = RunDir(cfg.output.dir, cfg.output.storage_options)
        run.fs.invalidate_cache()
        latest = run.latest_checkpoint()
        step = read_info(run, latest)["step"] if latest else 0
        resume = f"resume with bsgal run --resume {cfg.output.dir}"
        if watch.timed_out is not None:
            raise PlacementTimedOut(f"{watch.timed_out}; stopped at step {step} "
                                    f"(checkpoint {latest or 'none yet'}); {resume}")
        raise Interrupted(f"interrupted at step {step} ({signal.Signals(stopper.signum).name}"
                          f"); {resume}", stopper.signum)


def _demand_board(cfg: RunConfig, sampler: Any, categories: Sequence[dict],
                  point: ResumePoint) -> Any:
    """The demand actor of a closed-loop run (None when open loop), continuing the state of
    the checkpoint being resumed."""
    settings = feedback_settings(cfg)
    if not settings.closed or sampler is None:
        return None
    from pipeline.run.steering import start_demand_board

    snapshot = None
    if point.checkpoint is not None:
        run = RunDir(cfg.output.dir, cfg.output.storage_options)
        snapshot = read_info(run, point.checkpoint)["ranks"][0].get("feedback")
    return start_demand_board(settings, sampler, snapshot)


def train_storage(cfg: RunConfig) -> tuple[str, Any]:
    """Where Ray Train keeps its own run state: under the run's output (shared by every node
    by the check of :mod:`pipeline.cluster.nodes`), ``OUT/.ray-train``; for a URL output
    through the same fsspec filesystem as the shards (with its storage options)."""
    from pipeline.storage.filesystem import filesystem, is_local

    out = cfg.output.dir.rstrip("/")
    fs, root = filesystem(out, cfg.output.storage_options)
    if is_local(fs):
        return os.path.join(root, ".ray-train"), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return f"{root}/.ray-train", PyFileSystem(FSSpecHandler(fs))


def _torch_trainer(cfg: RunConfig, plan: Any, ds: Any, data_config: Any,
                   watch: Any = None) -> Any:
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from pipeline.run.train_worker import train_loop_per_worker

    t = cfg.training
    resources = {"CPU": t.num_cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    resources.update(t.resources_per_worker)
    storage, storage_fs = train_storage(cfg)

    class BsgalTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            # Ray Train's own handler would abort the workers without a checkpoint;
            # StopOnSignal (installed around fit) stops them cleanly instead. The watch may
            # abort the controller when the train workers cannot be placed.
            if watch is not None:
                watch.controller = controller

    # Ray Train's own restarts are off: a restarted worker group would read the candidate
    # stream from its start, while the run must drop the rows after its checkpoint and make
    # only the positions not yet decided (plan_resume); the driver's loop in _run_on_ray does.
    return BsgalTorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.to_dict(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        datasets={"candidates": ds},
        dataset_config=data_config,
        run_config=TrainRunConfig(storage_path=storage, storage_filesystem=storage_fs,
                                  name=f"{cfg.name}-{uuid.uuid4().hex[:8]}",
                                  failure_config=FailureConfig(max_failures=0)),
    )


def resume_job(out: str, overrides: Sequence[str] = (), *, progress: str = "auto",
               storage_options: dict[str, Any] | None = None, faults: Faults | None = None,
               echo: Callable[[str], None] = print) -> JobResult:
    """``bsgal run --resume OUT``: continue the run in ``out`` from its latest checkpoint."""
    out = out.rstrip("/")
    preflight_writable(out, fast_fail_options(out, storage_options))
    cfg = resume_config(out, overrides, storage_options)
    run = RunDir(out, cfg.output.storage_options)
    if run.exists("summary.json"):
        raise ConfigError(f"--resume {out}: that run already finished (summary.json); start "
                          "a new run in another output.dir")
    if run.latest_checkpoint() is None:
        write_run_config(run, cfg)  # a retry may have changed any key
    return run_job(cfg, resume=True, progress=progress, faults=faults, echo=echo)

"""The loop each Ray Train worker runs: candidates in, decisions out, steps, checkpoints.

Per worker (rank r of W)::

    real data (synthesised here if this machine lacks the built-in set)
    trainer = build_trainer(...)            (DDP-wrapped when W > 1), resumed from a checkpoint
    writer  = ShardWriter(OUT, rank=r)      decision rows → OUT/shards/decision=*/part-r...
    rounds of exactly one optimizer step on every rank:
      warmup: training.warmup_real_steps real-only steps
      else:   a step on the candidate batch being used up (trainer.take_candidates, then
              trainer.step_candidates until the batch is done; then its rows go to the writer)
              or, with no candidate here, a real-only "filler" step: the stream is done, the
              batch is late (late_candidates=real_step), or another rank is finishing its
              batch before a checkpoint. DDP needs every rank to take the same steps, so
              ranks agree before each step whether anyone still has candidates.
      every training.checkpoint_every steps, once every rank's batch is used up: flush the
      shards, write the checkpoint (stream offsets are then exact)
    until every rank's stream is used up and training.steps steps are done
    rank 0: final checkpoint, evaluation → OUT/eval.json

The stream accounting: every candidate that reaches a worker leaves exactly one row (the
trainer guarantees it per batch; the writer is flushed before each checkpoint and at the end).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

from generators.columns import reason_kind
from pipeline.config import RunConfig, candidate_batch_size, config_from_dict
from pipeline.run.costs import stage_devices, units_text
from pipeline.run.feed import END, CandidateFeed
from pipeline.run.rows import decision_row
from pipeline.run.window import RunCounters, WindowStats
from pipeline.storage.checkpoints import (
    config_hash,
    load_trainer_state,
    read_info,
    save_main,
    save_rank_state,
)
from pipeline.storage.run_dir import MetricsLog, RunDir
from pipeline.storage.shard_writer import ShardWriter

#: TrainingConfig keys that belong to the pipeline, not to `trainer.factory.build_trainer`.
PIPELINE_TRAINING_KEYS = ("num_cpus_per_worker", "candidate_batch_size", "prefetch_batches",
                          "late_candidates", "resources_per_worker", "max_failures", "weights")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What the driver tells every worker (``train_loop_config``; plain data + actor handle).

    Attributes:
        config: the resolved run config as a dict (credentials included: never logged).
        out: run folder (local or ``s3://``).
        resume_from: checkpoint name to continue from (``checkpoints/step-N.pt``) or None.
        progress: the :class:`pipeline.run.progress.ProgressBoard` actor, or None.
        crash_at_step: test hook: rank 0 flushes its shards and exits (as in a crash, without
            a checkpoint) once it reaches this step.
        demand: the closed loop's :class:`pipeline.run.steering.DemandBoard` actor, or None.
        kill_demand_at_step: test hook: rank 0 kills the demand actor once it reaches this
            step (the run must go on open loop).
    """

    config: dict[str, Any]
    out: str
    resume_from: str | None = None
    progress: Any = None
    crash_at_step: int | None = None
    demand: Any = None
    kill_demand_at_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def trainer_settings(cfg: RunConfig) -> dict[str, Any]:
    """The trainer's keys of ``training`` (``weights: random`` drops ``init_checkpoint``)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.training).items()
                if k not in PIPELINE_TRAINING_KEYS}
    if cfg.training.weights == "random":
        settings["init_checkpoint"] = None
    return settings


class RankSync:
    """What DDP ranks agree on before each step: whether any rank still holds candidates and
    whether any rank's stream may bring more (MAX over ranks). A no-op for one worker."""

    def __init__(self, world: int, device: Any) -> None:
        self.world = world
        self.device = device

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        if self.world == 1:
            return tuple(flags)
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


class TrainWorker:
    """One worker's run (see the module docstring)."""

    def __init__(self, plan: WorkerPlan, rank: int, world: int) -> None:
        import torch

        from pipeline.run.datasets import ensure_builtin_data, open_splits
        from trainer.factory import build_trainer

        self.plan = plan
        self.cfg = cfg = config_from_dict(plan.config)
        self.rank, self.world = rank, world
        if plan.progress is not None:
            from pipeline.run.progress import forward_warnings

            forward_warnings(plan.progress, f"trainer rank {rank}")
        torch.set_num_threads(max(1, int(cfg.training.num_cpus_per_worker)))
        ensure_builtin_data(cfg.data)
        train_set, val_set = open_splits(cfg.data)
        self.frequency = {c.id: c.frequency for c in train_set.categories}
        self.trainer = build_trainer(
            train_set, val_set, training=trainer_settings(cfg), selection=dataclasses.asdict(
                cfg.selection), seed=cfg.seed, rank=rank, max_eval_images=cfg.data.max_val_images)
        if world > 1:
            device = self.trainer.backend.device
            ids = [device.index] if device.type == "cuda" else None
            self.trainer.backend.wrap(
                lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids))
        self.sync = RankSync(world, self.trainer.backend.device)
        self.run = RunDir(plan.out, cfg.output.storage_options)
        self.cfg_hash = config_hash(cfg)
        self.counters = RunCounters()
        self.last_checkpoint_step = 0
        if plan.resume_from:
            self._resume(plan.resume_from)
        name = "metrics.jsonl" if rank == 0 else f"metrics-r{rank:03d}.jsonl"
        self.metrics = MetricsLog(self.run, name)
        self.writer = ShardWriter(plan.out, rank=rank, max_rows=cfg.output.shard_max_rows,
                                  flush_seconds=cfg.output.shard_flush_seconds,
                                  storage_options=cfg.output.storage_options)
        self.devices = stage_devices(cfg, self.trainer.backend.device.type == "cuda")
        self.cost_units = units_text(self.devices)
        pools = {"generate": cfg.generation.concurrency, "annotate": cfg.annotation.concurrency,
                 "check": cfg.annotation.check_concurrency}
        self.window = WindowStats(stage_pools=pools, first_step=self.trainer.step)
        self.pool: Any = None  # trainer.loop.CandidatePool of the batch being used up
        self.batch: dict[str, Any] | None = None  # its columns
        self.phase = "warmup"
        self._last_report = 0.0
        self._stop_ref: Any = None
        self._board_lost = False
        self.stopping = False
        self._demand_killed = False
        self.feedback = FeedbackLink(plan.demand, cfg.feedback.timeout_s) \
            if plan.demand is not None else None

    # -- resume ----------------------------------------------------------------------------

    def _resume(self, name: str) -> None:
        info = read_info(self.run, name)
        if info["world_size"] != self.world:
            raise ValueError(f"{self.run.uri(name)} was written by {info['world_size']} "
                             f"workers; this run has {self.world} (training.num_workers)")
        if info["config_hash"] != self.cfg_hash:
            raise ValueError(f"{self.run.uri(name)} was written with another config")
        self.trainer.load_state_dict(load_trainer_state(self.run, name, self.rank))
        mine = info["ranks"][self.rank]
        self.counters = RunCounters.from_dict(mine["counters"])
        self.last_checkpoint_step = int(info["step"])

    # -- the loop --------------------------------------------------------------------------

    def run_loop(self, batches: Any) -> None:
        """Rounds of exactly one optimizer step on every rank until the streams are used up
        and ``training.steps`` steps are done (module docstring)."""
        cfg, trainer = self.cfg, self.trainer
        feed = CandidateFeed(batches, depth=max(1, cfg.training.prefetch_batches))
        block = cfg.training.late_candidates == "wait"
        try:
            while True:
                stop = self._poll_stop()
                warmup = trainer.step < cfg.training.warmup_real_steps
                if not warmup and self.pool is None and not self._checkpoint_due() \
                        and not stop:
                    self._refill(feed, block)
                any_pool, any_more, stop = self.sync.any_of(self.pool is not None,
                                                            not feed.exhausted, stop)
                if stop and not any_pool:
                    # Interrupted: every rank's batch is used up, so the checkpoint written
                    # now is exact; the stream is closed below.
                    self.stopping = True
                    break
                if self._checkpoint_due() and not any_pool:
                    # Every rank's pool is used up: the stream offsets are exact.
                    self.checkpoint()
                    if not warmup:
                        self._refill(feed, block)
                    any_pool, any_more = self.sync.any_of(self.pool is not None,
                                                          not feed.exhausted)
                if not warmup and not any_pool and not any_more and \
                        trainer.step >= cfg.training.steps:
                    break
                before = trainer.step
                if warmup:
                    self._real_step("warmup")
                elif self.pool is not None:
                    self.phase = "candidates"
                    self._candidate_step()
                else:
                    # No candidate here: late (real_step mode), gone, or another rank is
                    # finishing its pool before a checkpoint. Keep the DDP ranks in step.
                    self.phase = "candidates" if any_more else "real-only (stream done)"
                    self._real_step("filler")
                self._after_step(before)
        finally:
            feed.close()
        if self.stopping:
            self._finish_interrupted()
        else:
            self._finish()

    def _poll_stop(self) -> bool:
        """Whether the driver asked to stop (polled without waiting on the progress actor)."""
        if self.stopping or self.plan.progress is None:
            return self.stopping
        import ray

        try:
            if self._stop_ref is None:
                self._stop_ref = self.plan.progress.stop_requested.remote()
            ready, _ = ray.wait([self._stop_ref], timeout=0)
            if ready:
                self._stop_ref = None
                self.stopping = bool(ray.get(ready[0]))
        except Exception as exc:  # noqa: BLE001 - the board is away (restarting): train on
            self._stop_ref = None
            if not self._board_lost:
                self._board_lost = True
                self.metrics.log("control_actor_unavailable", step=self.trainer.step,
                                 rank=self.rank, actor="progress",
                                 error=f"{type(exc).__name__}: {str(exc)[:200]}")
        return self.stopping

    def _refill(self, feed: CandidateFeed, block: bool) -> None:
        """Take the next batch that has candidates to paste (batches of invalid rows only are
        decided at once); leave ``self.pool`` None when the stream is done or, when not
        blocking, nothing is ready."""
        while self.pool is None:
            batch, waited = feed.next(block=block, interrupted=self._poll_stop)
            self.counters.wait_seconds += waited
            if batch is END or batch is None:
                self.window.add_wait(waited)
                return
            self.window.add_batch(batch, waited)
            pool = self.trainer.take_candidates(batch)
            if pool.done:
                self._write(batch, pool.decisions(), pool.seconds)
            else:
                self.pool, self.batch = pool, batch

    def _checkpoint_due(self) -> bool:
        every = self.cfg.training.checkpoint_every
        return bool(every) and self.trainer.step // every > self.last_checkpoint_step // every

    def _real_step(self, kind: str) -> None:
        log = self.trainer.train_real_step()
        if kind == "warmup":
            self.counters.warmup_steps += 1
        else:
            self.counters.filler_steps += 1
        self._log_step(log, kind)

    def _candidate_step(self) -> None:
        log = self.trainer.step_candidates(self.pool)
        extra = log["step"] >= self.cfg.training.steps
        self.counters.candidate_steps += 1
        self.counters.extra_steps += int(extra)
        self._log_step(log, "extra" if extra else "candidates")
        if self.pool.done:
            self._write(self.batch, self.pool.decisions(), self.pool.seconds)
            self.pool = self.batch = None

    def _write(self, batch: dict[str, Any], decisions: list[dict[str, Any]],
               seconds: list[tuple[float, float]]) -> None:
        """Send one decision row per candidate of ``batch`` to the shard writer, with what it
        cost (``seconds``: the trainer's scoring and training shares per row)."""
        rows = []
        for i, decision in enumerate(decisions):
            rows.append(decision_row(
                {k: v[i] for k, v in batch.items()}, decision, run_id=self.cfg.name,
                frequency=self.frequency, devices=self.devices, units=self.cost_units,
                trainer_seconds=seconds[i]))
            self.window.add_decision(decision)
            self.counters.count(reason_kind(decision["reason"]))
        self.writer.add(rows)
        if self.feedback is not None:
            self.feedback.record(rows, self.trainer.step)

    def _log_step(self, log: dict[str, Any], kind: str) -> None:
        log = dict(log)
        metrics = log.pop("metrics", None)
        step = log.pop("step")
        log.pop("kind", None)
        seconds = float(log.get("seconds", 0.0))
        self.counters.busy_seconds += seconds
        self.window.add_step(kind, seconds, float(log.get("loss", math.nan)))
        self.metrics.log("step", step=step, rank=self.rank, phase=kind, **log)
        if metrics is not None:
            self.metrics.log("eval", step=step + 1, rank=self.rank, metrics=metrics)

    def _log_calibration(self, step: int) -> None:
        """A calibrated threshold's reference per class (``bsgal inspect --table thresholds``)."""
        summary = getattr(getattr(self.trainer.selector, "threshold", None), "summary", None)
        if summary is not None:
            self.metrics.log("calibration", step=step, rank=self.rank,
                             classes={str(c): v for c, v in summary().items()})

    def _after_step(self, before: int) -> None:
        step, every = self.trainer.step, self.cfg.output.log_every
        if step // every > before // every:
            record = self.window.close(step)
            self.metrics.log("window", step=step, rank=self.rank, **record,
                             totals=self.counters.to_dict())
            self._log_allocation(step)
            self._log_calibration(step)
        self._report()
        kill = self.plan.kill_demand_at_step
        if kill is not None and step >= kill and self.rank == 0 and self.plan.demand is not None \
                and not self._demand_killed:
            import ray

            ray.kill(self.plan.demand)
            self._demand_killed = True
        crash = self.plan.crash_at_step
        if crash is not None and step >= crash and self.rank == 0:
            # Test hook: the rows decided so far reach storage (as a size or time flush would
            # have written them), then the process dies like a killed one: no checkpoint, no
            # cleanup.
            self.writer.flush()
            os._exit(1)

    def _report(self, force: bool = False) -> None:
        if self.plan.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_report < 0.5:
            return
        self._last_report = now
        try:
            self.plan.progress.trainer_state.remote(self.rank, {
                **self.counters.to_dict(), "step": self.trainer.step, "phase": self.phase})
        except Exception:  # noqa: BLE001 - progress is best effort; the board may restart
            pass

    # -- checkpoints and the end -----------------------------------------------------------

    def _log_allocation(self, step: int) -> None:
        """Rank 0: the allocation now in force (the loop's lag is in the shards:
        ``step - allocation_step``)."""
        if self.feedback is None or self.rank != 0:
            return
        record = self.feedback.report()
        self.metrics.log("allocation", step=step, rank=0, **record)

    def pipeline_state(self) -> dict[str, Any]:
        state = {"rank": self.rank, "stream_offset": self.trainer.stream_offset,
                 "counters": self.counters.to_dict()}
        if self.feedback is not None and self.rank == 0:
            state["feedback"] = self.feedback.snapshot()
        return state

    def checkpoint(self) -> None:
        """Flush the shards, then write this step's checkpoint (every rank takes part)."""
        self.writer.flush()
        step = self.trainer.step
        state = self.trainer.state_dict()
        pipelines = self.sync.gather(self.pipeline_state())
        if self.rank > 0:
            save_rank_state(self.run, step, self.rank, state)
        self.sync.barrier()
        if self.rank == 0:
            save_main(self.run, step, state, pipelines, self.cfg_hash,
                      keep=self.cfg.output.keep_checkpoints)
            self.metrics.log("checkpoint", step=step, name=self.run.checkpoint_name(step),
                             stream_offsets=[p["stream_offset"] for p in pipelines])
        self.sync.barrier()
        self.last_checkpoint_step = step

    def _finish_interrupted(self) -> None:
        """After an interrupt: checkpoint (even with checkpoint_every=0), flush, no evaluation."""
        self.phase = "interrupted: checkpoint"
        self._report(force=True)
        if self.last_checkpoint_step != self.trainer.step or \
                self.run.latest_checkpoint() is None:
            self.checkpoint()
        self.writer.close()
        self.metrics.log("interrupted", step=self.trainer.step, rank=self.rank,
                         rows_written=self.writer.rows_written, totals=self.counters.to_dict())
        self._log_skipped()
        self.phase = "interrupted"
        self._report(force=True)
        self.metrics.close()

    def _finish(self) -> None:
        self.phase = "final checkpoint"
        self._report(force=True)
        if self.cfg.training.checkpoint_every and self.last_checkpoint_step != self.trainer.step:
            self.checkpoint()  # every pool is used up here
        self.writer.close()
        record = self.window.close(self.trainer.step)
        self.metrics.log("window", step=self.trainer.step, rank=self.rank, **record,
                         totals=self.counters.to_dict())
        self.metrics.log("worker_done", step=self.trainer.step, rank=self.rank,
                         rows_written=self.writer.rows_written, totals=self.counters.to_dict())
        if self.rank == 0:
            self.phase = "evaluating"
            self._report(force=True)
            started = time.perf_counter()
            metrics = self.trainer.evaluate()
            self.run.write_json("eval.json", {
                "step": self.trainer.step, "seconds": time.perf_counter() - started,
                "max_val_images": self.cfg.data.max_val_images, **metrics})
            self.metrics.log("eval", step=self.trainer.step, rank=0, metrics=metrics,
                             final=True)
        self._log_skipped()
        self.phase = "done"
        self._report(force=True)
        self.metrics.close()

    def _log_skipped(self) -> None:
        """Images left out under ``data.bad_images=skip`` (read into the run summary)."""
        skipped = dict(self.trainer.train_set.skipped)
        if self.trainer.val_set is not None:
            skipped.update(self.trainer.val_set.skipped)
        if skipped:
            self.metrics.log("skipped_images", step=self.trainer.step, rank=self.rank,
                             files=skipped)


class FeedbackLink:
    """A trainer rank's side of the closed loop: decisions to the demand actor (fire and
    forget), its reports and snapshots with a bounded wait; a gone actor is said once in the
    metrics and never stops training."""

    def __init__(self, board: Any, timeout_s: float) -> None:
        self.board = board
        self.timeout_s = timeout_s
        self.failed: str | None = None
        self.last_snapshot: dict[str, Any] | None = None

    def record(self, rows: list[dict[str, Any]], step: int) -> None:
        if self.failed is not None or not rows:
            return
        classes = [int(r.get("class_id", -1)) for r in rows]
        options = [int(r.get("prompt_option", -1)) for r in rows]
        accepted = [bool(r.get("accepted", False)) for r in rows]
        try:
            self.board.record.remote(classes, options, accepted, step)
        except Exception as exc:  # noqa: BLE001 - the actor is gone: training goes on
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        self.failed = why
        log.warning("bsgal feedback: the demand actor is unavailable (%s); generation draws "
                    "open loop and training goes on", why)

    def _ask(self, method: str) -> Any:
        import ray

        if self.failed is not None:
            return None
        try:
            return ray.get(getattr(self.board, method).remote(), timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - timeout or a dead actor
            self._fail(type(exc).__name__)
            return None

    def report(self) -> dict[str, Any]:
        answer = self._ask("report")
        if answer is None:
            return {"unavailable": f"demand actor: {self.failed}; generation draws open loop"}
        return answer

    def snapshot(self) -> dict[str, Any] | None:
        answer = self._ask("snapshot")
        if answer is not None:
            self.last_snapshot = answer
        return self.last_snapshot


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    import ray.train

    plan = WorkerPlan(**config)
    ctx = ray.train.get_context()
    worker = TrainWorker(plan, ctx.get_world_rank(), ctx.get_world_size())
    cfg = worker.cfg
    shard = ray.train.get_dataset_shard("candidates")
    batches = shard.iter_batches(batch_size=candidate_batch_size(cfg), batch_format="numpy",
                                 prefetch_batches=cfg.training.prefetch_batches)
    worker.run_loop(batches)

"""The loop each Ray Train worker runs: candidates in, decisions out, steps, checkpoints.

Per worker (rank r of W)::

    real data (synthesised here if this machine lacks the built-in set)
    trainer = build_trainer(...)            (DDP-wrapped when W > 1), resumed from a checkpoint
    writer  = ShardWriter(OUT, rank=r)      decision rows → OUT/shards/decision=*/part-r...
    warmup: training.warmup_real_steps real-only steps
    rounds: next candidate batch → trainer.train_on_candidates → one row per candidate
            (no batch ready and late_candidates=real_step, or stream gone: a real-only step)
            W > 1: ranks exchange their step counts; those behind take real-only steps, so
            every rank runs the same number of DDP steps
            checkpoint every training.checkpoint_every steps (shards flushed first)
    until the stream is exhausted on every rank and training.steps steps are done
    rank 0: final checkpoint, evaluation → OUT/eval.json

The stream accounting: every candidate that reaches a worker leaves exactly one row (the
trainer guarantees it per batch; the writer is flushed before each checkpoint and at the end).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from pipeline.checkpoints import config_hash, load_trainer_state, read_info, save_main, \
    save_rank_state
from pipeline.config import RunConfig, config_from_dict
from pipeline.feed import END, CandidateFeed
from pipeline.graph import STAGES
from pipeline.run_dir import MetricsLog, RunDir
from pipeline.shards import SCHEMA, ShardWriter
from pipeline.window import RunCounters, WindowStats

#: TrainingConfig keys that belong to the pipeline, not to `trainer.factory.build_trainer`.
PIPELINE_TRAINING_KEYS = ("num_cpus_per_worker", "candidate_batch_size", "prefetch_batches",
                          "late_candidates", "resources_per_worker")
#: Candidate columns copied into a decision row (the rest of the shard schema comes from the
#: trainer's decision and the run).
CANDIDATE_COLUMNS = tuple(name for name in SCHEMA.names if name not in {
    "run_id", "class_frequency", "image_png", "mask_rle", "stream_offset", "score", "threshold",
    "accepted", "reason", "step", "rank", "cache_norm", "batch_id", "method", "decided_at",
}) + ("image", "mask")


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What the driver tells every worker (``train_loop_config``; plain data + actor handle).

    Attributes:
        config: the resolved run config as a dict (credentials included: never logged).
        out: run folder (local or ``s3://``).
        resume_from: checkpoint name to continue from (``checkpoints/step-N.pt``) or None.
        progress: the :class:`pipeline.progress.ProgressBoard` actor, or None.
        crash_at_step: test hook: the worker process exits (as in a crash) once it reaches
            this step.
    """

    config: dict[str, Any]
    out: str
    resume_from: str | None = None
    progress: Any = None
    crash_at_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def candidate_batch_size(cfg: RunConfig) -> int:
    """Candidates per `train_on_candidates` call (about one or two steps' worth)."""
    t = cfg.training
    return t.candidate_batch_size or t.batch_size * t.max_pastes_per_image


def trainer_settings(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg.training).items()
            if k not in PIPELINE_TRAINING_KEYS}


class RankSync:
    """Keeps DDP ranks in step: after each round every rank learns the largest step count and
    whether any rank still has candidates. A no-op for one worker."""

    def __init__(self, world: int, device: Any) -> None:
        self.world = world
        self.device = device

    def agree(self, step: int, has_more: bool) -> tuple[int, bool]:
        if self.world == 1:
            return step, has_more
        import torch
        import torch.distributed as dist

        t = torch.tensor([step, int(has_more)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]), bool(t[1])

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

        from pipeline.datasets import ensure_builtin_data, open_splits
        from trainer.factory import build_trainer

        self.plan = plan
        self.cfg = cfg = config_from_dict(plan.config)
        self.rank, self.world = rank, world
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
        pools = {"generate": cfg.generation.concurrency, "annotate": cfg.annotation.concurrency,
                 "check": cfg.annotation.check_concurrency}
        self.window = WindowStats(stage_pools=pools, first_step=self.trainer.step)
        self.phase = "warmup"
        self._last_report = 0.0

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
        cfg, trainer = self.cfg, self.trainer
        feed = CandidateFeed(batches, depth=max(1, cfg.training.prefetch_batches))
        block = cfg.training.late_candidates == "wait"
        try:
            while True:
                before = trainer.step
                has_more = True
                if trainer.step < cfg.training.warmup_real_steps:
                    self._real_step("warmup")
                else:
                    self.phase = "candidates"
                    batch, waited = feed.next(block=block)
                    if batch is END:
                        has_more = False
                        self.window.add_wait(waited)
                    elif batch is None:
                        self.window.add_wait(waited)
                        self._real_step("filler")
                    else:
                        self.window.add_batch(batch, waited)
                        self.counters.wait_seconds += waited
                        self._candidates(batch)
                step, any_more = self.sync.agree(trainer.step, has_more)
                while trainer.step < step:  # DDP: catch up with the rank that went furthest
                    self._real_step("filler")
                if not any_more:
                    if trainer.step >= cfg.training.steps:
                        break
                    self.phase = "real-only (stream done)"
                    self._real_step("filler")
                self._after_round(before)
        finally:
            feed.close()
        self._finish()

    def _real_step(self, kind: str) -> None:
        log = self.trainer.train_real_step()
        if kind == "warmup":
            self.counters.warmup_steps += 1
        else:
            self.counters.filler_steps += 1
        self._log_step(log, kind)

    def _candidates(self, batch: dict[str, Any]) -> None:
        cfg = self.cfg
        result = self.trainer.train_on_candidates(batch)
        n = len(result.decisions)
        rows = []
        for i, decision in enumerate(result.decisions):
            row = {k: batch[k][i] for k in CANDIDATE_COLUMNS if k in batch}
            row.update(decision)
            row["run_id"] = cfg.name
            row["class_frequency"] = self.frequency.get(int(row.get("class_id", -1)), "")
            rows.append(row)
            self.window.add_decision(decision)
            kind = decision["reason"]
            if kind == "accepted":
                self.counters.accepted += 1
            elif kind.startswith("rejected"):
                self.counters.rejected += 1
            else:
                self.counters.invalid += 1
        self.counters.decided += n
        self.writer.add(rows)
        for log in result.steps:
            extra = log["step"] >= cfg.training.steps
            self.counters.candidate_steps += 1
            self.counters.extra_steps += int(extra)
            self._log_step(log, "extra" if extra else "candidates")

    def _log_step(self, log: dict[str, Any], kind: str) -> None:
        log = dict(log)
        metrics = log.pop("metrics", None)
        step = log.pop("step")
        log.pop("kind", None)
        self.counters.busy_seconds += float(log.get("seconds", 0.0))
        self.window.add_step(kind, float(log.get("seconds", 0.0)), float(log.get("loss", math.nan)))
        self.metrics.log("step", step=step, rank=self.rank, phase=kind, **log)
        if metrics is not None:
            self.metrics.log("eval", step=step + 1, rank=self.rank, metrics=metrics)

    def _after_round(self, before: int) -> None:
        cfg, step = self.cfg, self.trainer.step
        every = cfg.output.log_every
        if step // every > before // every:
            record = self.window.close(step)
            self.metrics.log("window", step=step, rank=self.rank, **record,
                             totals=self.counters.to_dict())
        every = cfg.training.checkpoint_every
        if every and step // every > self.last_checkpoint_step // every:
            self.checkpoint()
        self._report()
        crash = self.plan.crash_at_step
        if crash is not None and step >= crash and self.rank == 0:
            os._exit(1)  # test hook: die like a killed process (no flush, no cleanup)

    def _report(self, force: bool = False) -> None:
        if self.plan.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_report < 0.5:
            return
        self._last_report = now
        self.plan.progress.trainer_state.remote(self.rank, {
            **self.counters.to_dict(), "step": self.trainer.step, "phase": self.phase})

    # -- checkpoints and the end -----------------------------------------------------------

    def pipeline_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "stream_offset": self.trainer.stream_offset,
                "counters": self.counters.to_dict()}

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

    def _finish(self) -> None:
        self.phase = "final checkpoint"
        self._report(force=True)
        if self.cfg.training.checkpoint_every and self.last_checkpoint_step != self.trainer.step:
            self.checkpoint()
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
        self.phase = "done"
        self._report(force=True)
        self.metrics.close()


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

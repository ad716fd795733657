"""Does the candidate stream scale with the number of generation actors, and does it keep the
trainer fed?

Run from the repository root::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/pipeline_scaling.py [--quick]

Generation is simulated the way a GPU generator looks to the rest of the pipeline: a stage whose
latency is fixed per batch (``--latency`` s for ``--batch`` rows) and which holds no CPU while
it waits (it sleeps; its actors ask for 0.01 CPU, as a GPU actor would ask for a GPU). Everything
after it is the real graph of :mod:`pipeline.run.graph` (built-in annotator and quality checks in
their timed actor pools) and the real ingestion of the trainer: a Ray Train ``TorchTrainer``
worker reading ``get_dataset_shard`` through :class:`pipeline.run.feed.CandidateFeed`, with the
split configured by :class:`pipeline.run.train_data_config.CandidateDataConfig`.

1. Scaling: with 1, 2, 4 and 8 generation actors and a consumer that takes candidates as fast as
   they come, the candidates/s arriving at the trainer while every actor is producing (slope
   of the cumulative arrivals from one latency after the last actor's first batch to one
   latency before the first actor's last batch; actor start-up is a one-off cost, reported in
   part 2), and the ratio to ideal linear scaling, ``actors x batch / latency``. Target:
   >= 0.85 up to 8 actors.
2. Feeding: with generation capacity above the trainer's demand (a simulated training step that
   sleeps ``--step`` s per ``--step-candidates`` candidates, holding no CPU), the fraction of the
   steady run the trainer spends blocked waiting for its next batch. Target: <= 5 %.

Numbers are wall-clock on whatever else the machine runs (2 CPU cores here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402


class FixedLatencyGenerator:
    """Stand-in for a GPU generator: ``latency`` seconds per batch whatever its size, no CPU
    used while waiting; emits one pre-rendered image per row (same columns as a generator)."""

    def __init__(self, latency: float, categories: list, image_size: int) -> None:
        from generators.procedural import ProceduralGenerator

        self.latency = latency
        one = {"class_id": np.array([categories[0]["id"]]), "seed": np.array([0])}
        self.rendered = ProceduralGenerator(categories=categories, image_size=image_size,
                                            failure_rates={})(one)

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.latency)
        n = len(batch["sample_id"])
        out = dict(batch)
        for key in ("image", "generator", "truth_failure", "truth_class_id", "status",
                    "error"):
            out[key] = np.repeat(self.rendered[key], n, axis=0)
        out["bench_actor"] = np.full(n, os.getpid(), dtype=np.int64)
        return out


def build_fixed_latency(**kwargs) -> FixedLatencyGenerator:
    return FixedLatencyGenerator(**kwargs)


def consume(config: dict) -> None:
    """Ray Train worker: read the candidate stream, optionally 'train' (sleep) per batch."""
    import ray.train

    from pipeline.run.feed import END, CandidateFeed

    shard = ray.train.get_dataset_shard("candidates")
    feed = CandidateFeed(shard.iter_batches(batch_size=config["consume_batch"],
                                            batch_format="numpy", prefetch_batches=2), depth=2)
    arrivals, waits = [], []
    step = config["step_seconds"] / config["step_candidates"]
    while True:
        batch, waited = feed.next()
        if batch is END:
            break
        n = len(batch["sample_id"])
        arrivals.append((time.monotonic(), n, sorted(set(batch["bench_actor"].tolist()))))
        waits.append(waited)
        if step:
            time.sleep(step * n)  # a training step: accelerator time, no CPU
    feed.close()
    Path(config["result"]).write_text(json.dumps({"arrivals": arrivals, "waits": waits}))


def run_stream(cfg, categories, actors: int, latency: float, batch: int, num_rows: int,
               step_seconds: float, step_candidates: int, work: Path) -> dict:
    import ray
    from ray.data import ExecutionOptions
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from generators import ClassVocabulary, PromptSampler
    from pipeline.run.graph import StageSpec, build_candidate_dataset, stage_specs
    from pipeline.run.train_data_config import CandidateDataConfig

    sampler = PromptSampler(ClassVocabulary.from_categories(categories), run_id="bench")
    prompts = sampler.sample_batch(num_rows)
    specs = stage_specs(cfg, categories)
    specs[0] = StageSpec("generate", build_fixed_latency,
                         {"latency": latency, "categories": categories,
                          "image_size": cfg.generation.image_size},
                         batch, actors, 0.01, 0.0)
    ds = build_candidate_dataset(cfg, prompts, categories, specs=specs)
    result = work / f"consume-{actors}-{step_seconds}.json"
    options = ExecutionOptions(
        resource_limits=ray.data.DataContext.get_current().execution_options.resource_limits,
        preserve_order=False)
    trainer = TorchTrainer(
        consume,
        train_loop_config={"consume_batch": step_candidates, "step_seconds": step_seconds,
                           "step_candidates": step_candidates, "result": str(result)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        datasets={"candidates": ds}, dataset_config=CandidateDataConfig(options),
        run_config=RunConfig(storage_path=str(work / "ray-train"), name=f"bench-{actors}",
                             failure_config=FailureConfig(max_failures=0)))
    trainer.fit()
    return json.loads(result.read_text())


def steady_rate(arrivals: list, latency: float) -> tuple[float, float]:
    """Candidates/s at the trainer while every generation actor is producing.

    The window runs from one latency after the last actor's first batch to one latency before
    the first actor's last batch. Candidates arrive in bursts (one downstream block at a time),
    so the rate is measured between bursts: the rows of the 2nd..last burst in the window over
    the time from the first to the last burst (exact for periodic bursts). Also returns the
    window's length in seconds.
    """
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for t, _, actors in arrivals:
        for a in actors:
            first.setdefault(a, t)
            last[a] = t
    start = max(first.values()) + latency
    end = min(last.values()) - latency
    bursts: list[list[float]] = []  # [time of first arrival, rows]
    for t, n, _ in arrivals:
        if bursts and t - bursts[-1][0] < 0.25 * latency:
            bursts[-1][1] += n
        else:
            bursts.append([t, n])
    inside = [b for b in bursts if start <= b[0] <= end]
    if len(inside) < 3:
        raise RuntimeError("fewer than 3 bursts in the steady window: raise --batches-per-actor")
    rows = sum(n for _, n in inside[1:])
    return rows / (inside[-1][0] - inside[0][0]), end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per generated batch")
    parser.add_argument("--batch", type=int, default=16, help="rows per generated batch")
    parser.add_argument("--batches-per-actor", type=int, default=16)
    parser.add_argument("--downstream-batch", type=int, default=64,
                        help="rows per batch of the (cheap, CPU) annotation and check stages")
    parser.add_argument("--actors", default="1,2,4,8")
    parser.add_argument("--step", type=float, default=0.25, help="simulated step seconds")
    parser.add_argument("--step-candidates", type=int, default=8,
                        help="candidates per simulated step")
    parser.add_argument("--feed-actors", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer batches, actors 1,2,4")
    args = parser.parse_args()
    if args.quick:
        args.batches_per_actor, args.actors = 12, "1,2,4"

    import ray

    from pipeline.cluster.connect import start_local_ray
    from pipeline.config import load_config
    from pipeline.run.datasets import ensure_builtin_data, train_categories
    from pipeline.run.graph import configure_data_context

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", [
            f"data.root={work / 'data'}", "data.synth_train_images=200",
            "data.synth_val_images=12", "generation.image_size=64",
            f"annotation.batch_size={args.downstream_batch}",
            f"annotation.check_batch_size={args.downstream_batch}",
            "annotation.num_cpus=0.25", "annotation.check_num_cpus=0.25"])
        ensure_builtin_data(cfg.data)
        categories = train_categories(cfg.data)
        start_local_ray(num_cpus=2)
        configure_data_context(cfg, 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"generation: {args.latency:.2f} s per batch of {args.batch} "
              f"(ideal {args.batch / args.latency:.0f} candidates/s per actor), "
              f"{args.batches_per_actor}+ batches per actor; annotation and checks in batches "
              f"of {args.downstream_batch}; {os.cpu_count()} CPUs\n")
        print(f"{'actors':>6} {'cand/s':>8} {'ideal':>7} {'ratio':>6} {'window s':>9}")
        for n in [int(x) for x in args.actors.split(",")]:
            # Few actors fill a downstream batch slowly: run long enough for ~5 bursts.
            k = max(args.batches_per_actor,
                    math.ceil(5 * args.downstream_batch / (n * args.batch)) + 6)
            out = run_stream(cfg, categories, n, args.latency, args.batch,
                             n * args.batch * k, 0.0, 8, work)
            rate, window = steady_rate(out["arrivals"], args.latency)
            ideal = n * args.batch / args.latency
            print(f"{n:>6} {rate:>8.1f} {ideal:>7.1f} {rate / ideal:>6.2f} {window:>9.1f}",
                  flush=True)

        capacity = args.feed_actors * args.batch / args.latency
        demand = args.step_candidates / args.step
        out = run_stream(cfg, categories, args.feed_actors, args.latency, args.batch,
                         args.feed_actors * args.batch * args.batches_per_actor, args.step,
                         args.step_candidates, work)
        times = [t for t, _, _ in out["arrivals"]]
        waits = out["waits"][1:]  # the first wait is the pipeline filling up
        busy = sum(n for _, n, _ in out["arrivals"][1:]) * args.step / args.step_candidates
        total = sum(waits) + busy
        print(f"\ntrainer fed by {args.feed_actors} actors: capacity {capacity:.0f} "
              f"candidates/s, demand {demand:.0f} candidates/s "
              f"({args.step:.2f} s per step of {args.step_candidates})")
        print(f"first batch after {out['waits'][0]:.1f} s (actors starting); then "
              f"{len(waits)} batches over {times[-1] - times[0]:.1f} s: waited {sum(waits):.2f} s "
              f"= {100 * sum(waits) / total:.1f} % of the time (target <= 5 %)")
        ray.shutdown()


if __name__ == "__main__":
    main()

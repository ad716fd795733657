"""Throughput of the generation/annotation stages on CPU, and the cost of running them in Ray.

Run from the repository root::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/stages.py [--quick]

Prints three tables, every number measured in this run:

1. samples/s of each stage in plain Python (prompt sampler, procedural generator, builtin
   annotator, quality check, tiny random-weight Stable Diffusion, tiny SAM);
2. SAM with several images per ``Sam.forward`` vs one image at a time, same images, for the
   tiny test SAM and larger "small" SAMs (masks compared for equality);
3. a stage under Ray Data (``map_batches``, one actor) vs a plain loop over the same batches,
   at two batch sizes: end to end (actor start-up included) and marginal (the extra cost per
   additional sample, from two dataset sizes, so the fixed start-up cancels), plus the implied
   Ray cost per batch. Target: marginal overhead <= 15 %. Ray's cost is per batch, so a stage
   needs batches worth ~100 ms of work to stay under it (a GPU SD/SAM batch is seconds).

Timings are wall-clock on whatever else the machine runs; plain and Ray runs are interleaved
and the minimum of the repeats is kept.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402


def _timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _slice(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def _batches(batch: dict, size: int) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [_slice(batch, i, min(i + size, n)) for i in range(0, n, size)]


def stage_throughput(quick: bool) -> list[tuple[str, str, float]]:
    import torch

    from annotators import BuiltinAnnotator, QualityCheck, SamAnnotator
    from annotators.tiny import build_tiny_sam
    from generators import PromptSampler
    from generators.procedural import ProceduralGenerator
    from generators.stable_diffusion import StableDiffusionGenerator
    from generators.tiny import write_tiny_sd_pipeline

    torch.set_num_threads(1)
    n = 64 if quick else 256
    rows = []
    sampler = PromptSampler.builtin(12, run_id="bench")
    prompts = sampler.sample_batch(n)
    t = _timed(lambda: sampler.sample_batch(n))
    rows.append(("prompt sampler", f"{n} rows", n / t))

    gen = ProceduralGenerator(num_classes=12, image_size=128)
    t = _timed(lambda: [gen(b) for b in _batches(prompts, 32)])
    rows.append(("procedural generator", "128 px, batch 32", n / t))
    generated = gen(prompts)

    builtin = BuiltinAnnotator()
    t = _timed(lambda: [builtin(b) for b in _batches(generated, 32)])
    rows.append(("builtin annotator", "128 px, batch 32", n / t))
    annotated = builtin(generated)

    check = QualityCheck()
    t = _timed(lambda: [check(b) for b in _batches(annotated, 32)])
    rows.append(("quality check", "128 px, batch 32", n / t))

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_sd_pipeline(Path(tmp) / "tiny-sd")
        sd = StableDiffusionGenerator(model=str(folder), steps=2, resolution=64, offline=True)
        m = 16 if quick else 32
        sd_rows = _slice(prompts, 0, m)
        t = _timed(lambda: [sd(b) for b in _batches(sd_rows, 8)], repeats=2)
        rows.append(("tiny Stable Diffusion", "64 px, 2 steps, batch 8", m / t))

    sam = SamAnnotator(model=build_tiny_sam(img_size=64), images_per_forward=8)
    sam_rows = {"image": _resize(generated["image"], 64)}
    t = _timed(lambda: [sam(b) for b in _batches(sam_rows, 8)])
    rows.append(("tiny SAM", "64 px, 8 images/forward", n / t))
    return rows


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size))) for im in images])


def sam_batching(quick: bool) -> list[tuple[str, int, float, float, bool]]:
    import torch

    from annotators import SamAnnotator
    from annotators.tiny import build_tiny_sam
    from generators import PromptSampler
    from generators.procedural import ProceduralGenerator

    torch.set_num_threads(1)
    out = []
    configs = [
        ("tiny (64 px, dim 32, depth 2)", 64, 32, 64 if quick else 128, 8),
        ("small (128 px, dim 64, depth 2)", 128, 64, 32 if quick else 64, 8),
        ("small (256 px, dim 64, depth 2)", 256, 64, 16 if quick else 32, 8),
    ]
    for name, img_size, dim, n, per_forward in configs:
        rows = PromptSampler.builtin(12, run_id="sam-bench").sample_batch(n)
        images = ProceduralGenerator(num_classes=12, image_size=img_size)(rows)["image"]
        model = build_tiny_sam(img_size=img_size, embed_dim=dim)
        batched = SamAnnotator(model=model, images_per_forward=per_forward)
        single = SamAnnotator(model=model, images_per_forward=1)
        batch = {"image": images}
        t_batched = _timed(lambda: batched(batch), repeats=2)
        t_single = _timed(lambda: single(batch), repeats=2)
        same = bool(np.array_equal(batched(batch)["mask"], single(batch)["mask"]))
        out.append((name, per_forward, n / t_batched, n / t_single, same))
    return out


def ray_overhead(quick: bool) -> list[tuple]:
    """Plain loop vs Ray Data for two stages and two batch sizes (min of repeated runs)."""
    import ray

    from annotators import BuiltinAnnotator
    from generators import PromptSampler
    from generators.procedural import ProceduralGenerator

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sizes = (256, 1024) if quick else (512, 2048)
    repeats = 1 if quick else 2
    sampler = PromptSampler.builtin(12, run_id="ray-bench")
    upstream = ProceduralGenerator(num_classes=12)
    stages = [
        ("procedural generator", ProceduralGenerator, {"num_classes": 12}, False),
        ("builtin annotator", BuiltinAnnotator, {}, True),
    ]
    results = []
    try:
        for name, cls, kwargs, needs_images in stages:
            for batch_size in (32, 128):
                plain_times, ray_times = [], []
                for n in sizes:
                    batch = sampler.sample_batch(n)
                    if needs_images:
                        batch = upstream(batch)
                    batches = _batches(batch, batch_size)
                    # The same rows as a materialised dataset: building it is not timed, like
                    # slicing the plain loop's batches.
                    source = ray.data.from_items(
                        [{k: v[i] for k, v in batch.items()} for i in range(n)],
                        override_num_blocks=max(1, n // batch_size),
                    ).materialize()

                    def plain() -> int:
                        stage = cls(**kwargs)
                        return sum(len(stage(b)["status"]) for b in batches)

                    def in_ray() -> int:
                        ds = source.map_batches(
                            cls, fn_constructor_kwargs=kwargs,
                            compute=ray.data.ActorPoolStrategy(size=1),
                            batch_size=batch_size, batch_format="numpy", zero_copy_batch=True,
                        )
                        return sum(
                            len(b["status"])
                            for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                        )

                    p_runs, r_runs = [], []
                    for _ in range(repeats):  # interleaved, so load changes hit both alike
                        for fn, runs in ((plain, p_runs), (in_ray, r_runs)):
                            start = time.perf_counter()
                            assert fn() == n
                            runs.append(time.perf_counter() - start)
                    plain_times.append(min(p_runs))
                    ray_times.append(min(r_runs))
                end_to_end = ray_times[1] / plain_times[1] - 1
                marginal = (ray_times[1] - ray_times[0]) / (plain_times[1] - plain_times[0]) - 1
                extra_batches = (sizes[1] - sizes[0]) / batch_size
                per_batch_ms = 1e3 * (
                    (ray_times[1] - ray_times[0]) - (plain_times[1] - plain_times[0])
                ) / extra_batches
                results.append((name, batch_size, sizes[1], plain_times[1], ray_times[1],
                                end_to_end, marginal, per_batch_ms))
    finally:
        ray.shutdown()
    return results


def main() -> None:
    import diffusers
    import transformers

    # The CLIP truncation notices of the tiny SD pipeline's prompts come from diffusers' logger;
    # the load/save progress bars ("Writing model shards", "Loading weights", "Loading pipeline
    # components") from transformers and diffusers.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    args = parser.parse_args()

    print(f"# stage benchmarks (CPU, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{os.cpu_count()} cores)\n")
    print("| stage | setting | samples/s |")
    print("|---|---|---:|")
    for name, setting, rate in stage_throughput(args.quick):
        print(f"| {name} | {setting} | {rate:.1f} |")

    print("\n| SAM | images/forward | batched samples/s | one-at-a-time samples/s | speed-up "
          "| same masks |")
    print("|---|---:|---:|---:|---:|---|")
    for name, per_forward, batched, single, same in sam_batching(args.quick):
        print(f"| {name} | {per_forward} | {batched:.1f} | {single:.1f} | "
              f"{batched / single:.2f}x | {same} |")

    print("\n| stage under Ray Data | batch | samples | plain loop s | Ray Data s | end-to-end "
          "overhead | marginal overhead (target <= 15 %) | Ray cost per batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, bs, n, plain, in_ray, end_to_end, marginal, per_batch in ray_overhead(args.quick):
        verdict = "ok" if marginal <= 0.15 else "above target"
        print(f"| {name} | {bs} | {n} | {plain:.2f} | {in_ray:.2f} | {end_to_end:+.1%} | "
              f"{marginal:+.1%} ({verdict}) | {per_batch:.1f} ms |")


if __name__ == "__main__":
    main()

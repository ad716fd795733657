"""The GPU check: each stage alone at real size, then the streaming job on one GPU.

Prepared for a short loan of one GPU (minutes, start-up included; ≤ 8 min on an H100): every
model is built at its real size with random weights (`generation.weights: random`, ...), since
no weights can be downloaded there and throughput and memory do not depend on the values.

1. **generation**: Stable Diffusion 1.5's UNet / VAE / text encoder, 512², the configured
   denoising steps, fp16, batch sizes 1 / 4 / 8: images/s and peak GPU memory.
2. **annotation**: SAM ViT-H, encoder + corner prompts on 512² images, 8 per forward:
   images/s and peak memory.
3. **training**: torchvision Mask R-CNN R50-FPN at 800 px, 2 real images and 8 candidates per
   step: ms/step plain copy-paste vs the default selection (the LVIS config's), the ratio,
   peak memory.
4. **stream**: the whole job (`bsgal run` path: Ray Data stages, Ray Train worker) for a fixed
   few minutes on the one GPU, the three stages on fractional GPU shares: candidates/s at the
   trainer, the trainer's share of time waiting for candidates, GPU utilisation (NVML where
   present, sampled every second).

Writes the results table as Markdown and JSON, ``gpu_check.{md,json}`` in benchmarks/results/
(``--out`` elsewhere), the card's name in both. ``--cpu-smoke`` runs the same code at tiny sizes on the CPU (tiny SD and SAM,
the small detector, a few candidates); the test suite runs it so that this script cannot rot.

    PYTHONPATH=. python benchmarks/gpu_check.py                 # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: The results files' name, before .md and .json.
REPORT_NAME = "gpu_check"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """What each part runs at."""

    device: str
    dtype: str
    sd_weights: str
    resolution: int
    sd_steps: int
    sd_batches: tuple[int, ...]
    sd_repeats: int
    sam_weights: str
    sam_images: int
    train_arch: str
    train_size: int
    train_steps: int
    stream_seconds: float
    stream_shares: dict[str, float] = field(default_factory=dict)


GPU = Sizes(device="cuda", dtype="float16", sd_weights="random", resolution=512, sd_steps=25,
            sd_batches=(1, 4, 8), sd_repeats=2, sam_weights="random", sam_images=8,
            train_arch="resnet50_fpn", train_size=800, train_steps=6, stream_seconds=150.0,
            stream_shares={"generate": 0.4, "annotate": 0.2, "train": 0.3})
CPU_SMOKE = Sizes(device="cpu", dtype="float32", sd_weights="random_tiny", resolution=64,
                  sd_steps=2, sd_batches=(1, 2), sd_repeats=1, sam_weights="random_tiny",
                  sam_images=2, train_arch="small", train_size=128, train_steps=2,
                  stream_seconds=0.0, stream_shares={})

#: The stream part on the CPU smoke: candidates (not seconds), so that it ends on time.
SMOKE_CANDIDATES = 16


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


# ------------------------------------------------------------------------------ 1 generation


def part_generation(s: Sizes) -> dict[str, Any]:
    from generators.random_weights import parameter_count
    from generators.stable_diffusion import StableDiffusionGenerator

    started = time.perf_counter()
    gen = StableDiffusionGenerator(model="-", weights=s.sd_weights, resolution=s.resolution,
                                   steps=s.sd_steps, dtype=s.dtype, device=s.device)
    built = time.perf_counter() - started
    params = parameter_count(gen.pipe)
    log(f"generation: {gen.version} built in {built:.1f} s ({params / 1e6:.3g} M parameters)")
    rows = []
    for batch in s.sd_batches:
        prompts = [f"a photo of a single object number {i}" for i in range(batch)]
        gen.generate(prompts, list(range(batch)))  # warm-up: kernels, allocator
        _reset_peak(s.device)
        t0 = time.perf_counter()
        for r in range(s.sd_repeats):
            images, _ = gen.generate(prompts, [r * batch + i for i in range(batch)])
        _sync(s.device)
        seconds = (time.perf_counter() - t0) / s.sd_repeats
        rows.append({"batch": batch, "seconds_per_batch": seconds,
                     "images_per_s": batch / seconds, "peak_mib": _peak_mib(s.device),
                     "image_shape": list(images.shape[1:])})
        log(f"generation: batch {batch}: {batch / seconds:.2f} images/s "
            f"({seconds:.2f} s per batch), peak {rows[-1]['peak_mib']} MiB")
    return {"version": gen.version, "parameters": params, "build_s": built,
            "resolution": s.resolution, "steps": s.sd_steps, "dtype": s.dtype, "rows": rows}


# ------------------------------------------------------------------------------ 2 annotation


def part_annotation(s: Sizes) -> dict[str, Any]:
    import numpy as np

    from annotators.sam import SamAnnotator, build_random_sam

    kind = "tiny" if s.sam_weights == "random_tiny" else "vit_h"
    started = time.perf_counter()
    sam = SamAnnotator(model=build_random_sam(kind, s.device), device=s.device,
                       version=f"sam:random-{kind}", images_per_forward=s.sam_images)
    built = time.perf_counter() - started
    params = sum(p.numel() for p in sam.model.parameters())
    log(f"annotation: {sam.version} built in {built:.1f} s ({params / 1e6:.3g} M parameters)")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (s.resolution, s.resolution, 3), dtype=np.uint8)
              for _ in range(s.sam_images)]
    sam.annotate_images(images)  # warm-up
    _reset_peak(s.device)
    t0 = time.perf_counter()
    results = sam.annotate_images(images)
    _sync(s.device)
    seconds = time.perf_counter() - t0
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"SAM failed on {len(failed)} of {len(images)} images: {failed[0]!r}")
    log(f"annotation: {len(images) / seconds:.2f} images/s, peak {_peak_mib(s.device)} MiB")
    return {"version": sam.version, "parameters": params, "build_s": built,
            "images": len(images), "image_side": s.resolution,
            "images_per_s": len(images) / seconds, "peak_mib": _peak_mib(s.device)}


# -------------------------------------------------------------------------------- 3 training


#: The built-in set both the training and the stream parts read (written once, at the
#: training size; the smallest the 12-class set allows).
DATA_IMAGES = {"train": 200, "val": 12}


def write_data(s: Sizes, work: Path) -> Path:
    from trainer.datasets import write_builtin_dataset

    started = time.perf_counter()
    root = write_builtin_dataset(work / "data", seed=0, num_train_images=DATA_IMAGES["train"],
                                 num_val_images=DATA_IMAGES["val"], image_size=s.train_size)
    log(f"data: the built-in set at {s.train_size} px in {time.perf_counter() - started:.0f} s")
    return root


def part_training(s: Sizes, root: Path) -> dict[str, Any]:
    from benchmarks._candidate_stream import real_cutouts
    from benchmarks.lvis_scale import STEP_METHODS, _by_distinct_classes
    from trainer.datasets import LvisDataset
    from trainer.factory import build_trainer

    ds = LvisDataset(root, "train.json")
    stream = real_cutouts(ds, 8 * (s.train_steps + 2) * 2, seed=1, prefix="g",
                          size=s.train_size // 4, wrong_fraction=0.4, mask_scores=True)
    training = {"arch": s.train_arch, "image_size": s.train_size, "batch_size": 2,
                "lr": 1e-4, "warmup_steps": 2, "steps": 100, "max_pastes_per_image": 4,
                "device": s.device}
    methods = {"plain": STEP_METHODS["plain"],
               "default": STEP_METHODS["default_sketch_training_batch"]}
    trainers = {name: build_trainer(ds, training=training, selection=sel, seed=0)
                for name, sel in methods.items()}
    seconds: dict[str, list[float]] = {n: [] for n in trainers}
    peaks: dict[str, float | None] = {}
    batches = _by_distinct_classes(stream, 8)
    names = list(trainers)
    for b, batch in enumerate(batches[:s.train_steps + 1]):
        for name in names[b % 2:] + names[:b % 2]:  # interleaved, order alternating
            _reset_peak(s.device)
            result = trainers[name].train_on_candidates(batch)
            _sync(s.device)
            peaks[name] = max(peaks.get(name) or 0.0, _peak_mib(s.device) or 0.0) \
                if s.device == "cuda" else None
            if b >= 1:  # the first step warms kernels and the image cache
                seconds[name].extend(st["seconds"] for st in result.steps)
    plain = statistics.median(seconds["plain"])
    rows = [{"method": n, "steps": len(v), "ms_per_step": 1000 * statistics.median(v),
             "ratio": statistics.median(v) / plain, "peak_mib": peaks.get(n)}
            for n, v in seconds.items()]
    for r in rows:
        log(f"training: {r['method']}: {r['ms_per_step']:.0f} ms/step ({r['ratio']:.2f}x), "
            f"peak {r['peak_mib']} MiB")
    return {"arch": s.train_arch, "image_size": s.train_size, "rows": rows}


# ---------------------------------------------------------------------------------- 4 stream


class GpuSampler:
    """GPU utilisation (%) every ``period`` s through NVML, when pynvml is importable."""

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
            self.available = True
        except Exception:  # noqa: BLE001 - no NVML: utilisation is reported as not measured
            pass
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(
                self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self) -> "GpuSampler":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def stream_overrides(s: Sizes, data_root: Path, out: Path, candidates: int,
                     steps: int) -> list[str]:
    """The run's config overrides (on configs/demo.yaml) for the stream part."""
    shares = s.stream_shares or {"generate": 0.0, "annotate": 0.0, "train": 0.0}
    on_gpu = s.device == "cuda"
    cpus = 1 if on_gpu else 0.25  # the smoke fits 2 cores
    return [
        f"data.root={data_root}", f"data.synth_image_size={s.train_size}",
        f"data.synth_train_images={DATA_IMAGES['train']}",
        f"data.synth_val_images={DATA_IMAGES['val']}", "data.max_val_images=4",
        "generation.backend=stable_diffusion", f"generation.weights={s.sd_weights}",
        f"generation.resolution={s.resolution}", f"generation.steps={s.sd_steps}",
        f"generation.dtype={s.dtype}", f"generation.num_candidates={candidates}",
        f"generation.batch_size={max(s.sd_batches)}", f"generation.num_gpus={shares['generate']}",
        f"generation.num_cpus={cpus}",
        "annotation.backend=sam", f"annotation.weights={s.sam_weights}",
        f"annotation.num_gpus={shares['annotate']}", f"annotation.num_cpus={cpus}",
        f"annotation.batch_size={s.sam_images}", "annotation.check_batch_size=8",
        "annotation.check_num_cpus=0.25",
        f"training.arch={s.train_arch}", f"training.image_size={s.train_size}",
        "training.weights=random", f"training.steps={steps}", "training.warmup_real_steps=1",
        "training.warmup_steps=1", f"training.checkpoint_every={max(steps, 1)}",
        "training.candidate_batch_size=8", "training.batch_size=2",
        f"training.use_gpu={'true' if on_gpu else 'false'}",
        f"training.device={'cuda' if on_gpu else 'cpu'}",
        "selection.quality_gates={}",  # random SAM's predicted IoU means nothing
        f"output.dir={out}", "output.shard_flush_seconds=5", "output.log_every=5",
    ]


def part_stream(s: Sizes, work: Path, root: Path, generation: dict[str, Any]) -> dict[str, Any]:
    import ray

    from pipeline.config import load_config
    from pipeline.run.job import run_job

    if s.stream_seconds > 0:  # as many candidates as generation makes in the time given
        rate = max(r["images_per_s"] for r in generation["rows"])
        candidates = max(32, int(rate * s.stream_seconds * 0.8) // 8 * 8)
    else:
        candidates = SMOKE_CANDIDATES
    steps = max(2, candidates // 8)
    overrides = stream_overrides(s, root, work / "stream", candidates, steps)
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    log(f"stream: {candidates} candidates, {steps} steps, GPU shares {s.stream_shares or '-'}")
    started = time.perf_counter()
    ours = not ray.is_initialized()  # a caller's Ray (the test suite's) stays up
    with GpuSampler() as gpu:
        result = run_job(cfg, progress="lines")
    seconds = time.perf_counter() - started
    if ours and ray.is_initialized():
        ray.shutdown()
    summary = result.summary
    totals = summary["workers"][0] if summary["workers"] else {}
    wait, busy = float(totals.get("wait_seconds", 0.0)), float(totals.get("busy_seconds", 0.0))
    decided = summary["decisions"]["rows"]
    out = {"candidates": candidates, "steps": steps, "seconds": seconds,
           "decided": decided, "counts_add_up": summary["counts_add_up"],
           "candidates_per_s": decided / seconds if seconds else None,
           "trainer_wait_share": wait / (wait + busy) if wait + busy > 0 else None,
           "gpu_utilisation_pct": gpu.mean(), "gpu_samples": len(gpu.samples),
           "random_weights": summary.get("random_weights"),
           "cost": summary.get("cost")}
    log(f"stream: {decided} decided in {seconds:.0f} s ({out['candidates_per_s']:.2f}/s), "
        f"trainer waiting {_fmt(out['trainer_wait_share'], '.0%')}, GPU utilisation "
        f"{_fmt(out['gpu_utilisation_pct'], '.0f')} %")
    return out


# ---------------------------------------------------------------------------------- report


def device_name(s: Sizes) -> str:
    import torch

    if s.device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}), smoke sizes"


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "not measured" if value is None else format(value, spec)


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{REPORT_NAME}.json").write_text(json.dumps(results, indent=2))
    g, a, t, st = (results.get(k) for k in ("generation", "annotation", "training", "stream"))
    millions = (lambda n: f"{n / 1e6:.0f} M") if not results["smoke"] else (lambda n: f"{n:,}")
    lines = [f"# GPU check: {results['device']}", "",
             f"Measured {results['date']} with `benchmarks/gpu_check.py"
             f"{' --cpu-smoke' if results['smoke'] else ''}` in {results['seconds']:.0f} s; "
             "random weights of the real architectures (throughput and memory only).", ""]
    if results["smoke"]:
        lines += ["**No GPU figures here**: this is the CPU smoke at tiny sizes (tiny SD and "
                  "SAM, the small detector), a check that the code path runs, not a "
                  "measurement of the real models.", ""]
    if g:
        lines += [f"## Generation: {g['version']}, {millions(g['parameters'])} parameters, "
                  f"{g['resolution']}², {g['steps']} steps, {g['dtype']}", "",
                  "| batch | images/s | s per batch | peak MiB |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['images_per_s']:.2f} | {r['seconds_per_batch']:.2f} | "
                  f"{_fmt(r['peak_mib'], '.0f')} |" for r in g["rows"]]
        lines.append("")
    if a:
        lines += [f"## Annotation: {a['version']}, {millions(a['parameters'])} parameters",
                  "", f"{a['images_per_s']:.2f} images/s ({a['images']} images of "
                  f"{a['image_side']}² per forward), peak MiB: {_fmt(a['peak_mib'], '.0f')}", ""]
    if t:
        lines += [f"## Training step: {t['arch']} at {t['image_size']} px, 2 images + 8 "
                  "candidates", "", "| method | ms/step | ratio | peak MiB |",
                  "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['ms_per_step']:.0f} | {r['ratio']:.2f} | "
                  f"{_fmt(r['peak_mib'], '.0f')} |" for r in t["rows"]]
        lines.append("")
    if st:
        share = st["trainer_wait_share"]
        lines += ["## Streaming job on one device", "",
                  f"{st['decided']} candidates decided in {st['seconds']:.0f} s: "
                  f"{_fmt(st['candidates_per_s'], '.2f')} candidates/s at the trainer; the "
                  f"trainer waited {_fmt(share, '.0%')} of its time; GPU utilisation (%, mean of "
                  f"{st['gpu_samples']} NVML samples): {_fmt(st['gpu_utilisation_pct'], '.0f')}; "
                  "counts add up: "
                  f"{st['counts_add_up']}.", ""]
    (out / f"{REPORT_NAME}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same code at tiny sizes on the CPU (the test suite)")
    parser.add_argument("--parts", default="generation,annotation,training,stream")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS}; smoke: required)")
    args = parser.parse_args(argv)
    import torch

    if args.cpu_smoke:
        if args.out is None:
            parser.error("--cpu-smoke writes its results to --out DIR (not benchmarks/results)")
        sizes = CPU_SMOKE
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device here; run on the GPU machine, or --cpu-smoke")
        sizes = GPU
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    started = time.perf_counter()
    results: dict[str, Any] = {"device": device_name(sizes), "smoke": args.cpu_smoke,
                               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "generation" in parts or "stream" in parts:
            results["generation"] = part_generation(sizes)
        if "annotation" in parts:
            results["annotation"] = part_annotation(sizes)
        root = write_data(sizes, work) if {"training", "stream"} & set(parts) else None
        if "training" in parts:
            results["training"] = part_training(sizes, root)
        if "stream" in parts:
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
            results["stream"] = part_stream(sizes, work, root, results["generation"])
    results["seconds"] = time.perf_counter() - started
    write_report(results, args.out or RESULTS)
    log(f"done in {results['seconds']:.0f} s: {(args.out or RESULTS) / (REPORT_NAME + '.md')}")
    return results


if __name__ == "__main__":
    main()

"""Cost of BSGAL's selector next to one backward pass, on CPU.

For models of about 1M, 10M and 40M trainable parameters, measures side by side in one run:

- backward: ``torch.autograd.grad`` of the loss w.r.t. all parameters (forward excluded);
- selector: ``GradientCache.update`` with that gradient + ``contribution_score`` (cosine) of a
  second gradient, i.e. the per-step selector work of the faithful step;
- extra memory of the selector in bytes per parameter: the persistent cache (and the
  `FlatGradient` buffer on the flat path) plus the peak of temporaries seen by the profiler
  during update + score.

Two model families: convolutional nets at image inputs (the detector case: each weight is used at
many positions, so a backward is expensive per parameter), and plain MLPs (the worst case: a
backward costs only a few multiply-adds per parameter per sample). Two gradient forms: the
per-parameter list that ``torch.autograd.grad`` returns (no copy) and a flat `FlatGradient`
buffer (one copy, one more fp32 vector). Storage fp32 vs bf16.

Targets (issue 3): selector ≤ 5 % of a backward; extra memory ≤ 4 B/param (fp32 cache),
≤ 2 B/param (bf16 cache).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/selector_overhead.py`` (about 2 min).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.profiler's Kineto backend logs to stderr on every ``profile()``: "USDT: ...
# SyncActivityProfilerHandler.cpp] profiler_start" / "profiler_stop", and once per process
# "ERROR: ... DeviceProperties.cpp] gpuGetDeviceCount failed with code 35" where no CUDA driver
# is installed (it probes GPUs even for CPU-only activities). Its levels run VERBOSE=0 .. USDT=5;
# 6 mutes them. Read when the profiler first starts; set KINETO_LOG_LEVEL to see them again.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from selector import FlatGradient, GradientCache, contribution_score  # noqa: E402


@dataclass
class Workload:
    name: str
    model: nn.Module
    make_loss: Callable[[nn.Module], torch.Tensor]


def conv_workload(name: str, builder: Callable[..., nn.Module], batch: int, size: int) -> Workload:
    model = builder(num_classes=1000)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    return Workload(f"{name} {batch}x{size}px", model, lambda m: F.cross_entropy(m(x), y))


def mlp_workload(hidden: int, batch: int) -> Workload:
    model = nn.Sequential(nn.Linear(1024, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, 1000))
    x = torch.randn(batch, 1024)
    y = torch.randint(0, 1000, (batch,))
    return Workload(f"mlp h={hidden} batch {batch}", model, lambda m: F.cross_entropy(m(x), y))


def mask_rcnn_workload() -> Workload:
    """torchvision Mask R-CNN R50-FPN (random weights), 2 images of 640x480, 2 objects each: the
    trainer's default detector at a detector-sized input."""
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=480, max_size=640)
    model.train()
    images = [torch.rand(3, 480, 640) for _ in range(2)]
    targets = []
    for _ in range(2):
        masks = torch.zeros(2, 480, 640, dtype=torch.uint8)
        masks[0, 60:220, 50:200] = 1
        masks[1, 100:400, 300:500] = 1
        targets.append({"boxes": torch.tensor([[50.0, 60, 200, 220], [300, 100, 500, 400]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    return Workload("mask_rcnn_r50_fpn 2x640x480", model,
                    lambda m: sum(m(images, targets).values()))


def workloads(quick: bool) -> list[Workload]:
    conv = [
        conv_workload("squeezenet1_1", torchvision.models.squeezenet1_1, 2, 224),
        conv_workload("resnet18", torchvision.models.resnet18, 2, 224),
        conv_workload("resnet101", torchvision.models.resnet101, 2, 224),
    ]
    mlp = [mlp_workload(h, 64) for h in (420, 1500, 3080)]
    if quick:
        return conv[:2] + mlp[:2]
    return conv + [mask_rcnn_workload()] + mlp


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_temporary_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated and not yet freed while ``fn`` runs (CPU profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        if event.name == "[memory]":
            changes.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage > 0:
            changes.append((event.time_range.start, event.self_cpu_memory_usage))
    changes.sort()
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def measure(work: Workload, repeats: int) -> list[dict[str, object]]:
    """Rows for fp32/bf16 storage × per-parameter/flat gradients. A backward is timed before each
    storage dtype's rows (interleaved, so machine load hits both sides alike); ratios use their
    median."""
    torch.manual_seed(0)
    params = [p for p in work.model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    backward_times: list[float] = []

    def timed_backward() -> list[torch.Tensor | None]:
        loss = work.make_loss(work.model)
        start = time.perf_counter()
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        backward_times.append(time.perf_counter() - start)
        return grads

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        real = timed_backward()
        candidate = [None if g is None else g.roll(1) for g in real]  # a different gradient
        for form in ("per-param", "flat"):
            cache = GradientCache(params, dtype=dtype)
            flat = FlatGradient(params) if form == "flat" else None
            real_in = real if flat is None else flat.copy_from(real).clone()
            cand_in = candidate if flat is None else flat.copy_from(candidate)
            cache.update(real_in)

            def step(real_in=real_in, cand_in=cand_in, cache=cache) -> float:
                cache.update(real_in)
                return contribution_score(cache, cand_in).value

            selector = median_time(step, repeats)
            copy = 0.0 if flat is None else median_time(lambda f=flat: f.copy_from(real), repeats)
            persistent = cache.nbytes() + (0 if flat is None else flat.buffer.numel() * 4)
            temporary = peak_temporary_bytes(step)
            rows.append({
                "model": work.name, "params": numel, "dtype": str(dtype).replace("torch.", ""),
                "form": form, "selector_s": selector, "copy_s": copy,
                "persistent_bpp": persistent / numel, "temporary_bpp": temporary / numel,
            })
    backward = statistics.median(backward_times)
    for row in rows:
        row["backward_s"] = backward
        row["backward_spread"] = (min(backward_times), max(backward_times))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models only")
    parser.add_argument("--repeats", type=int, default=5, help="selector timings per row")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU\n")
    header = (f"{'cache':<10}{'gradient':<11}{'update+score':>13}{'ratio':>8}{'+flat copy':>12}"
              f"{'extra B/param':>15}{'= persistent + temporary':>26}")
    for work in workloads(args.quick):
        rows = measure(work, args.repeats)
        low, high = rows[0]["backward_spread"]
        print(f"{work.name}: {rows[0]['params'] / 1e6:.1f}M parameters, backward "
              f"{rows[0]['backward_s'] * 1e3:.0f} ms (2 runs: {low * 1e3:.0f}, "
              f"{high * 1e3:.0f} ms)")
        print("  " + header)
        for row in rows:
            ratio = row["selector_s"] / row["backward_s"]
            with_copy = (f"{(row['selector_s'] + row['copy_s']) / row['backward_s']:.1%}"
                         if row["form"] == "flat" else "-")
            extra = row["persistent_bpp"] + row["temporary_bpp"]
            print(f"  {row['dtype']:<10}{row['form']:<11}{row['selector_s'] * 1e3:>11.1f}ms"
                  f"{ratio:>8.1%}{with_copy:>12}{extra:>15.2f}"
                  f"{row['persistent_bpp']:>17.2f} + {row['temporary_bpp']:.2f}")
        print()
    print("ratio = (cache update + cosine score) / one backward; '+flat copy' adds copying the "
          "autograd gradient into the FlatGradient buffer.\nextra B/param = persistent selector "
          "memory (the cache, plus the 4 B/param FlatGradient buffer on the flat path) + peak "
          "temporaries during update+score.\ntargets: ratio <= 5 %; extra <= 4 B/param (fp32 "
          "cache), <= 2 B/param (bf16 cache).")


if __name__ == "__main__":
    main()

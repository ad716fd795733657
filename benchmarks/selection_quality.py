"""Selection quality: does BSGAL beat "use everything" and cheaper filters on the built-in set?

On the built-in long-tailed set (12 classes; rare ones have 2-6 training images), where the
generator's truth is known:

1. **Methods.** Per seed, one detector is pretrained on real data only (the reference trains
   BSGAL from a trained baseline); every method then fine-tunes from that checkpoint for the
   same number of optimizer steps on the same candidate stream (written once per seed: identical
   candidates for every method): no generated data (the same number of real-only steps),
   accept-all, random acceptance at the rate BSGAL faithful/dynamic measured on that seed, a
   quality filter on the annotator's ``mask_score`` (a CLIP score cannot be computed here: no
   weights can be downloaded), BSGAL faithful with the fixed threshold (−0.05) and with the
   dynamic one, and the exact look-ahead, all deciding once per step's pasted batch; then the
   instance-level methods (one decision per candidate, names ``instance_*``): the quality gate
   alone (mask_score), the detector's own loss, the BSGAL contribution with class caches, the
   composite (gate, then contribution) and random at the composite's rate; plus, as a reference
   that is not a method, accept-all on the good candidates only (an oracle).
   Reported: LVIS AP/APr/APc/APf (segm, bbox) as mean ± std over seeds, paired differences,
   acceptance rate, precision and recall of acceptance against the generator's truth, time per
   step; per failure kind of the generator, the share accepted and the ROC AUC of the
   decision score (good vs that kind).
2. **Noise** (paper §5.1.1): the same good objects with Gaussian pixel noise of increasing σ on
   the object, scored at the pretrained weights with identical state for every level: score
   distribution per level (PNG) and acceptance under the fixed and the dynamic threshold.
3. **Fidelity**: for pasted batches with the generator's failures, the first-order batch score
   against the exact look-ahead loss change: Spearman ρ, sign agreement. (The per-instance
   estimators are checked in benchmarks/instance_scores.py.)

The candidate stream is the embedded pipeline's own (rare-boost prompts → procedural generator
with 40 % failures: 10 % each wrong_class, broken, clutter, noise → built-in annotator →
X-Paste quality checks). Batch-level decisions are per step (one pasted batch: the candidates
pasted onto the step's ``batch_size`` real images), as in the reference.

Tuning: the sizes, the quality-filter threshold, which BSGAL rate random acceptance copies and
the instance keep fraction were chosen on seed 100 only (see ``TUNING``); the reported seeds are
0, 1, 2, fixed before any of their results was seen.

    PYTHONPATH=. python benchmarks/selection_quality.py            # ~60 min on 2 cores
    PYTHONPATH=. python benchmarks/selection_quality.py --quick    # ~2-5 min, 1 seed, tiny sizes

Writes ``benchmarks/results/selection_quality.{md,json}`` and ``noise_scores.png`` (``--quick``:
a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from benchmarks._candidate_stream import (
    FAILURE_RATES,
    make_candidate_stream,
    save_stream,
)
from benchmarks._method_runs import RunJob, Sizes, finetune, method_specs, one_thread, pretrain
from benchmarks._quality_report import (
    aggregate_methods,
    fidelity_markdown,
    kinds_markdown,
    methods_markdown,
    noise_markdown,
    plot_noise,
)
from benchmarks._score_probes import (
    fidelity_probe,
    noise_probe,
    summarise_fidelity,
    summarise_noise,
)

FULL = Sizes(train_images=600, val_images=150, pretrain_steps=800, finetune_steps=300,
             candidates=0, candidate_batch=8, batch_size=4, max_pastes_per_image=3, lr=5e-4,
             finetune_lr=5e-4, probe_batches=24, fidelity_batches=30,
             noise_levels=(0.0, 0.1, 0.2, 0.4, 0.8))
QUICK = dataclasses.replace(FULL, pretrain_steps=60, finetune_steps=16, probe_batches=2,
                            fidelity_batches=4)
SEEDS = (0, 1, 2)
TUNING_SEED = 100
#: What was chosen on the tuning seed, and why (recorded in the JSON; the tuning run's own
#: output is benchmarks/results/tuning_seed100.md).
TUNING = {
    "seed": TUNING_SEED,
    "quality_threshold": 0.8,
    "keep_fraction": 0.5,
    "instance_keep": 0.7,
    "notes": [
        "sizes (800 pretraining + 300 fine-tuning steps, 40 % failures): on seed 100 accept-all "
        "on good candidates only beat no generated data by +18.9 segm APr and accept-all with "
        "the failures by +6.1, so the set-up can show an effect of selection",
        "quality filter: batch-mean mask_score >= 0.8 kept 60 % of the batches on seed 100, "
        "about the share BSGAL's dynamic threshold keeps (good candidates' mask_score: 5th "
        "percentile 0.87; clutter median 0.54; noise median 0.19)",
        "keep_fraction 0.5 and fine-tuning lr 5e-4 (the demo config's lr) were not tuned",
        "BSGAL faithful with the fixed threshold accepted 98 % of the batches on seed 100, "
        "efficient mode 100 % of the probe batches: random acceptance copies the rate of BSGAL "
        "faithful with the dynamic threshold, and efficient mode runs with the dynamic one",
        "instance level (seed 100, benchmarks/instance_scores.py at the pretrained weights, 476 "
        "instances): the contribution cosine separates good from failed candidates only with a "
        "cache per class (ROC AUC 0.58 with one cache of all classes, 0.74 per class over all "
        "parameters, 0.81 per class over the box head + predictor); hence class caches over "
        "the heads, averaged (0.81 vs 0.80 momentum 0.1 vs 0.67 this batch only)",
        "instance keep fraction per class, composite on seed 100 (segm APr; accept-all 27.9, "
        "oracle 33.9): keep 0.5 → 31.5, 0.6 → 31.2, 0.7 → 34.6, 0.8 → 30.5; 0.7 chosen (good "
        "accepted 89 %, wrong_class 27 %); the quality gate alone gave 26.3",
        "instance quality gate: mask_score >= 0.8, the same minimum as the batch filter",
    ],
}
#: Exact look-ahead step sizes for the fidelity probe: the fine-tuning learning rate (the
#: look-ahead baseline's α at the peak of the schedule) and a large SGD-like step.
ALPHAS = (5e-4, 0.05)


def with_candidates(sizes: Sizes) -> Sizes:
    """Enough candidates for the fine-tuning steps of the oracle (60 % good), with margin."""
    return dataclasses.replace(sizes, candidates=sizes.finetune_steps * 10 + 200)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def prepare_data(work: Path, sizes: Sizes, seeds: list[int]) -> dict[str, Any]:
    """The real set (one for all seeds) and, per seed, the candidate streams on disk."""
    from trainer.datasets import write_builtin_dataset

    root = work / "data"
    if not (root / "val.json").exists():
        write_builtin_dataset(root, seed=0, num_train_images=sizes.train_images,
                              num_val_images=sizes.val_images)
    train_json = root / "train.json"
    paths: dict[str, Any] = {"data_root": str(root), "seeds": {}}
    for seed in seeds:
        files = {name: work / f"seed{seed}_{name}.npz" for name in ("stream", "probe", "fidelity")}
        if not files["stream"].exists():
            save_stream(files["stream"], make_candidate_stream(
                train_json, sizes.candidates, seed=seed, run_id=f"selection-quality-{seed}"))
        if not files["probe"].exists():  # good objects only: the noise experiment's objects
            save_stream(files["probe"], make_candidate_stream(
                train_json, sizes.probe_batches * sizes.candidate_batch, seed=seed,
                run_id=f"noise-probe-{seed}", failure_rates={}))
        if not files["fidelity"].exists():
            save_stream(files["fidelity"], make_candidate_stream(
                train_json, 2 * sizes.fidelity_batches * sizes.candidate_batch, seed=seed,
                run_id=f"fidelity-probe-{seed}"))
        paths["seeds"][seed] = {k: str(v) for k, v in files.items()}
    return paths


@dataclasses.dataclass
class Task:
    """A job for the process pool, with the tasks it waits for."""

    key: str
    fn: Callable[[RunJob], dict[str, Any]]
    make_job: Callable[[dict[str, dict[str, Any]]], RunJob]
    after: tuple[str, ...] = ()
    cost: float = 1.0  # rough relative cost: longer tasks start first


def run_tasks(tasks: list[Task], workers: int) -> dict[str, dict[str, Any]]:
    """Run the tasks on ``workers`` processes (spawned, one thread each) respecting ``after``."""
    done: dict[str, dict[str, Any]] = {}
    waiting = {t.key: t for t in tasks}
    running: dict[Future, Task] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                             initializer=one_thread) as pool:
        while waiting or running:
            ready = sorted((t for t in waiting.values() if all(a in done for a in t.after)),
                           key=lambda t: -t.cost)
            for task in ready[: max(0, workers - len(running))]:
                del waiting[task.key]
                running[pool.submit(task.fn, task.make_job(done))] = task
                log(f"start {task.key}")
            if not running:
                raise RuntimeError(f"tasks can never start (missing dependencies): "
                                   f"{sorted(waiting)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                done[task.key] = future.result()
                r = done[task.key]
                extra = ""
                if "metrics" in r:
                    extra = (f" segm AP {100 * r['metrics']['segm']['AP']:.1f} APr "
                             f"{100 * r['metrics']['segm']['APr']:.1f}")
                if "batches" in r:
                    extra += f", batches accepted {100 * r['batches']['acceptance_rate']:.0f} %"
                if "wall_s" in r:
                    extra += f", {r['wall_s']:.0f} s"
                log(f"done  {task.key}{extra}")
    return done


def build_tasks(paths: dict[str, Any], sizes: Sizes, seeds: list[int], methods: list[Any],
                work: Path, probes: bool) -> list[Task]:
    tasks: list[Task] = []
    cost = {"lookahead": 2.3, "bsgal_faithful_fixed": 2.2, "bsgal_faithful_dynamic": 2.1,
            "instance_composite": 1.4, "instance_bsgal": 1.3}
    for seed in seeds:
        files = paths["seeds"][seed]
        base = RunJob(data_root=paths["data_root"], seed=seed, sizes=sizes,
                      checkpoint=str(work / f"seed{seed}_pretrained.pt"),
                      stream_path=files["stream"])
        pre_key = f"pretrain/seed{seed}"
        tasks.append(Task(pre_key, pretrain, lambda done, b=base: b, cost=10.0))
        for spec in methods:
            def make(done: dict[str, dict[str, Any]], b: RunJob = base, spec: Any = spec
                     ) -> RunJob:
                p = None
                if spec.random_rate_from is not None:
                    p = done[f"{spec.random_rate_from}/seed{b.seed}"]["batches"][
                        "acceptance_rate"]
                return dataclasses.replace(b, spec=spec, random_p=p)

            after = (pre_key,) if spec.random_rate_from is None else (
                pre_key, f"{spec.random_rate_from}/seed{seed}")
            tasks.append(Task(f"{spec.name}/seed{seed}", finetune, make, after,
                              cost.get(spec.name, 1.0)))
        if probes:
            tasks.append(Task(f"noise/seed{seed}", noise_probe, lambda done, b=base, f=files:
                              dataclasses.replace(b, extra={"probe_stream": f["probe"]}),
                              (pre_key,), 1.5))
            tasks.append(Task(f"fidelity/seed{seed}", fidelity_probe, lambda done, b=base, f=files:
                              dataclasses.replace(b, extra={"fidelity_stream": f["fidelity"],
                                                            "alphas": list(ALPHAS)}),
                              (pre_key,), 1.5))
    return tasks


def sizes_line(sizes: Sizes, seeds: list[int], workers: int) -> str:
    return (f"real set: built-in, {sizes.train_images} train / {sizes.val_images} val images, "
            f"128 px, 12 classes (4 rare with 2-6 train images); detector: small Mask R-CNN "
            f"(torchvision, CPU); seeds {seeds}; per seed: {sizes.pretrain_steps} real-only "
            f"pretraining steps (AdamW lr {sizes.lr:g}), then {sizes.finetune_steps} "
            f"fine-tuning steps per method (lr {sizes.finetune_lr:g}, warmup 20, cosine), batch "
            f"{sizes.batch_size} real images, 0-{sizes.max_pastes_per_image} pastes per image, "
            f"candidate batches of {sizes.candidate_batch}, {sizes.candidates} candidates "
            f"generated per seed ({int(100 * sum(FAILURE_RATES.values()))} % failed: "
            + ", ".join(f"{k} {100 * v:.0f} %" for k, v in FAILURE_RATES.items())
            + f"); noise probe {sizes.probe_batches} batches × {len(sizes.noise_levels)} levels "
            f"per seed; fidelity probe {sizes.fidelity_batches} batches per seed; {workers} "
            "worker processes, 1 thread each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (~2-5 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {list(SEEDS)} "
                        "(--quick: 0)")
    parser.add_argument("--methods", nargs="+", help="subset of method names (default: all)")
    parser.add_argument("--no-probes", action="store_true", help="skip noise and fidelity")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--finetune-lr", type=float)
    parser.add_argument("--quality-threshold", type=float, default=TUNING["quality_threshold"])
    parser.add_argument("--keep-fraction", type=float, default=TUNING["keep_fraction"])
    parser.add_argument("--instance-keep", type=float, default=TUNING["instance_keep"],
                        help="per-class keep fraction of the instance-level methods")
    parser.add_argument("--stem", default="selection_quality",
                        help="name of the result files (<stem>.md, <stem>.json)")
    parser.add_argument("--out", help="output folder (default benchmarks/results; --quick: a "
                        "temporary folder)")
    parser.add_argument("--work-dir", help="keep data, streams and checkpoints here (reused "
                        "when the sizes match); default: a temporary folder")
    args = parser.parse_args()
    one_thread()

    sizes = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                   ("finetune_steps", args.finetune_steps),
                                   ("finetune_lr", args.finetune_lr)) if v is not None}
    sizes = with_candidates(dataclasses.replace(sizes, **overrides))
    seeds = list(args.seeds) if args.seeds else ([0] if args.quick else list(SEEDS))
    specs = method_specs(args.quality_threshold, args.keep_fraction, args.instance_keep)
    if args.methods:
        unknown = sorted(set(args.methods) - {s.name for s in specs})
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {[s.name for s in specs]}")
        wanted = set(args.methods)
        for s in specs:  # random acceptance needs the method whose rate it copies
            if s.name in wanted and s.random_rate_from:
                wanted.add(s.random_rate_from)
        specs = [s for s in specs if s.name in wanted]
    if TUNING_SEED in seeds and not args.quick and len(seeds) > 1:
        log(f"warning: seed {TUNING_SEED} is the tuning seed; report other seeds")

    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="selection_quality_")) if args.quick
        else Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    tag = hashlib.blake2b(repr(dataclasses.astuple(sizes)).encode(), digest_size=4).hexdigest()
    work = Path(args.work_dir) / tag if args.work_dir else Path(
        tempfile.mkdtemp(prefix="selection_quality_work_"))
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    log(sizes_line(sizes, seeds, args.workers))
    paths = prepare_data(work, sizes, seeds)
    log(f"data and candidate streams ready in {work} ({time.perf_counter() - started:.0f} s)")
    tasks = build_tasks(paths, sizes, seeds, specs, work, probes=not args.no_probes)
    done = run_tasks(tasks, args.workers)
    wall = time.perf_counter() - started

    runs = [r for k, r in done.items() if not k.startswith(("pretrain/", "noise/",
                                                             "fidelity/"))]
    pretrained = [done[f"pretrain/seed{s}"] for s in seeds]
    summary = aggregate_methods(runs, specs)
    noise_runs = [done[k] for k in done if k.startswith("noise/")]
    fidelity_runs = [done[k] for k in done if k.startswith("fidelity/")]
    noise = summarise_noise(noise_runs, args.keep_fraction) if noise_runs else {}
    fidelity = summarise_fidelity(fidelity_runs) if fidelity_runs else {}

    command = "PYTHONPATH=. python benchmarks/selection_quality.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    info = machine()
    def start(kind: str, metric: str) -> float:
        return 100 * sum(p["metrics"][kind][metric] for p in pretrained) / len(pretrained)

    title = "# Selection quality on the built-in long-tailed set" + (" (--quick)" if args.quick
                                                                     else "")
    md = [title,
          "", f"`{command}`; {info['cores']} cores ({info['cpu']}), torch {info['torch']}; "
          f"wall time {wall / 60:.1f} min.", "", sizes_line(sizes, seeds, args.workers) + ".",
          "", "Pretrained start (real data only) ×100, mean over seeds: " + ", ".join(
              f"{kind} AP {start(kind, 'AP'):.1f} / APr {start(kind, 'APr'):.1f}"
              for kind in ("segm", "bbox")) + ".", "", "## Methods", "",
          methods_markdown(summary)]
    kinds = kinds_markdown(summary)
    if kinds:
        md += ["", "## Acceptance by failure kind", "",
               "Candidates accepted per kind of the generator's truth, and ROC AUC of each "
               "method's decision score between good candidates and each failure kind (among "
               "candidates that got a score; the composite's gated-out candidates have none). "
               "Mean ± std over seeds.", "", kinds]
    if noise:
        md += ["", "## Noise experiment (paper §5.1.1)", "",
               "Same good objects, Gaussian noise of σ × 255 added to the object's pixels; "
               "scored at the pretrained weights with the state restored for every level "
               f"(dynamic: keep {args.keep_fraction:.0%} of a stream mixing all levels). "
               "Plot: `noise_scores.png`.", "", noise_markdown(noise)]
    if fidelity:
        md += ["", "## Fidelity of the first-order score", "", fidelity_markdown(fidelity)]
    png = out / ("noise_scores.png" if not args.quick else "noise_scores_quick.png")
    if noise:
        plot_noise(noise, png)
    stem = args.stem + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    payload = {
        "command": command, "machine": info, "wall_s": wall, "sizes": dataclasses.asdict(sizes),
        "seeds": seeds, "tuning": TUNING, "failure_rates": FAILURE_RATES,
        "quality_threshold": args.quality_threshold, "keep_fraction": args.keep_fraction,
        "instance_keep": args.instance_keep,
        "methods": summary, "runs": runs, "pretrained": pretrained,
        "noise": {m: {lv: {k: v for k, v in d.items()} for lv, d in per.items()}
                  for m, per in noise.items()},
        "fidelity": fidelity, "fidelity_rows": [r for f in fidelity_runs for r in f["rows"]],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print("\n".join(md))
    log(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}"
        + (f", {png}" if noise else "") + f"; total {wall / 60:.1f} min")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Selection at LVIS scale: class caches that fit, the sketch against the exact cosine, the cost
of a step at ResNet-50 FPN 800 px, and how old the caches are when read.

torchvision ``maskrcnn_resnet50_fpn`` with random weights (nothing is downloaded), 1203 classes
+ background where the part needs them:

(a) **Memory** of the class caches for 1, 10, 100 and 1203 classes seen, exact (a copy of the
    box head and predictor per class) and sketched (`selector.class_sketch`), measured on
    caches actually built (the exact ones for as many classes as fit here, then by size per
    class), and as `trainer.cache_memory` predicts.
(b) **Estimator**: per class, Pearson of the sketched cosine with the exact one over 200
    candidates (100 real boxes of the class, 100 boxes of other classes labelled as it: the
    generator's wrong-class failure). RoI features come from real forwards of procedural
    scenes (a check of the estimator, not of the weights). The exact cosine is computed from
    the same per-box factors (exact for rank-one gradients, checked here against full
    flattened gradients on a few candidates); the bases are fitted on boxes of other classes.
(c) **Step time**, CPU: plain copy-paste vs the default (sketched caches fed by the step's own
    images) vs the previous default (exact caches, an extra real "test" batch), interleaved step
    by step from the same weights, at 800 px, 2 real images and 8 candidates of 8 classes per
    step (the built-in set written at 800 px; real cut-outs as candidates, 40 % relabelled).
(d) **Cache age at read** under repeat-factor sampling on an LVIS-shaped stream (simulated):
    1203 classes with LVIS v1's rare/common/frequent counts and image counts, ~100 k images,
    the project's `RepeatFactorSampler` (t = 0.001) at 2 images per step, 8 candidates per step
    drawn with the rare_boost weights (r 4, c 2, f 1); a class's cache is refreshed when it is
    in the step's images, or by the top-up (at most ``topup_images`` images per step, empty
    caches first, then the oldest over ``cache_max_age``).

Results: ``benchmarks/results/lvis_scale.md`` and ``.json``.

    PYTHONPATH=. python benchmarks/lvis_scale.py [--parts a,b,c,d] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
LVIS_CLASSES = 1203
#: LVIS v1 train: classes per frequency group (rare: 1-10 images, common: 11-100, frequent:
#: > 100) and its number of images.
LVIS_GROUPS = {"r": 337, "c": 461, "f": 405}
LVIS_IMAGES = 100_170


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ (a) memory


def part_memory() -> dict[str, Any]:
    from selector.class_sketch import InputBasis, LayerFactors, SketchedClassCaches
    from selector.instance_selector import ClassGradientCaches
    from trainer.backends.torchvision_arch import box_classifier_layers
    from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
    from trainer.cache_memory import MIB, cache_memory

    backend = TorchvisionMaskRCNN.build(LVIS_CLASSES, "resnet50_fpn", 800)
    head = backend.classifier_parameters()
    exact = ClassGradientCaches(head)
    g = torch.zeros(sum(p.numel() for p in head))
    for c in range(2):  # built for two classes: the size per class is the same for all
        exact.update(c, g + 1.0)
    exact_per_class = exact.nbytes / 2
    layers = [(n, i, o) for n, i, o in box_classifier_layers("resnet50_fpn", LVIS_CLASSES)
              if "bbox_pred" not in n]
    rng = torch.Generator().manual_seed(0)
    sketch = SketchedClassCaches(rank=8)
    sketch.set_basis(InputBasis.fit([LayerFactors(n, torch.randn(16, i, generator=rng),
                                                  torch.randn(16, o, generator=rng))
                                     for n, i, o in layers], 8))
    factors = [LayerFactors(n, torch.randn(4, i, generator=rng), torch.randn(4, o, generator=rng))
               for n, i, o in layers]
    rows = []
    selection = {"granularity": "instance", "method": "composite", "sketch_rank": 8}
    done = 0
    for seen in (1, 10, 100, LVIS_CLASSES):
        while done < seen:
            sketch.update(done, factors)
            done += 1
        predicted_exact = cache_memory("resnet50_fpn", seen, {**selection,
                                                              "cache_sketch": "none"})
        predicted_sketch = cache_memory("resnet50_fpn", seen, {**selection,
                                                               "cache_sketch": "input_basis"})
        rows.append({"classes": seen,
                     "exact_mib": exact_per_class * seen / MIB,
                     "exact_predicted_mib": predicted_exact.total / MIB,
                     "sketch_mib": sketch.nbytes / MIB,
                     "sketch_predicted_mib": predicted_sketch.total / MIB})
        log(f"(a) {seen} classes: exact {rows[-1]['exact_mib']:,.1f} MiB, sketch "
            f"{rows[-1]['sketch_mib']:,.2f} MiB")
    return {"rows": rows, "exact_numbers_per_class": int(exact_per_class // 4),
            "sketch_numbers_per_class": predicted_sketch.numbers_per_class}


# --------------------------------------------------------------------------- (b) estimator


def _scenes(count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Procedural scenes of many objects: image and ground-truth boxes (labels are set later)."""
    from generators.looks import make_looks, render_object

    rng = np.random.default_rng(seed)
    looks = make_looks(40)
    out = []
    for _ in range(count):
        image = np.full((size, size, 3), 235, np.uint8) + rng.integers(0, 15, (size, size, 3),
                                                                        dtype=np.uint8)
        boxes = []
        for _ in range(60):
            h, w = (int(v) for v in rng.integers(24, size // 4, 2))
            y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            rgb, m = render_object(looks[int(rng.integers(len(looks)))], h, w, rng)
            image[y:y + h, x:x + w][m] = rgb[m]
            boxes.append([x, y, x + w, y + h])
        out.append({"image": image, "boxes": np.asarray(boxes, np.float32)})
    return out


def _box_inputs(backend: Any, scenes: list[dict[str, Any]]) -> torch.Tensor:
    """The box head's RoI-pooled inputs of every box of ``scenes`` (no gradient)."""
    from trainer.backends.base import image_tensor

    pooled = []
    for s in scenes:
        target = {"boxes": torch.as_tensor(s["boxes"]),
                  "labels": torch.ones(len(s["boxes"]), dtype=torch.int64)}
        pooled.append(backend.gt_box_head_inputs([image_tensor(s["image"])], [target]))
    return torch.cat(pooled)


def _exact_cosines(cache_factors: list[Any], cand_factors: list[Any]) -> np.ndarray:
    """The exact cosine of each candidate's gradient with the mean of the cache boxes'
    gradients, from the factors: ⟨δ_a x_aᵀ, δ_b x_bᵀ⟩ = (δ_a·δ_b)(x_a·x_b), biases δ_a·δ_b."""
    dot = 0.0
    gram = 0.0
    norms = 0.0
    n = cache_factors[0].x.shape[0]
    for c, k in zip(cache_factors, cand_factors):
        dd = (c.delta.double() @ k.delta.double().T)          # n x K
        xx = (c.x.double() @ k.x.double().T)
        dot = dot + (dd * (xx + 1.0)).sum(0) / n
        cd = c.delta.double() @ c.delta.double().T
        cx = c.x.double() @ c.x.double().T
        gram = gram + (cd * (cx + 1.0)).sum() / n ** 2
        norms = norms + (k.delta.double() ** 2).sum(1) * ((k.x.double() ** 2).sum(1) + 1.0)
    return (dot / torch.sqrt(gram * norms)).numpy()


def part_estimator(args: argparse.Namespace) -> dict[str, Any]:
    from selector.class_sketch import InputBasis, SketchedClassCaches
    from selector.instance_selector import ClassGradientCaches
    from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
    from trainer.head_factors import head_factors, linear_layers
    from trainer.instance_scores import flat

    torch.manual_seed(0)
    backend = TorchvisionMaskRCNN.build(LVIS_CLASSES, "resnet50_fpn", args.scene_size)
    backend.module.train()
    layers = linear_layers([("box_head", backend.module.roi_heads.box_head),
                            ("box_predictor", backend.module.roi_heads.box_predictor)])
    started = time.perf_counter()
    pooled = _box_inputs(backend, _scenes(args.scenes, args.scene_size, seed=1))
    basis_pooled = _box_inputs(backend, _scenes(args.basis_scenes, args.scene_size, seed=2))
    log(f"(b) {len(pooled)} + {len(basis_pooled)} boxes pooled in "
        f"{time.perf_counter() - started:.0f} s")
    rng = np.random.default_rng(3)
    classes = rng.choice(np.arange(1, LVIS_CLASSES + 1), args.classes, replace=False)
    # Evaluation boxes get the evaluated classes; basis boxes other classes only.
    labels = torch.as_tensor(rng.choice(classes, len(pooled)), dtype=torch.int64)
    others = np.setdiff1d(np.arange(1, LVIS_CLASSES + 1), classes)
    basis_labels = torch.as_tensor(rng.choice(others, len(basis_pooled)), dtype=torch.int64)
    _, basis_factors = head_factors(backend.head_losses, basis_pooled, basis_labels, layers)
    basis = InputBasis.fit(basis_factors, args.rank)
    rows = []
    for y in classes.tolist():
        own = torch.nonzero(labels == y).flatten()
        other = torch.nonzero(labels != y).flatten()
        cache_rows, good = own[:args.cache_boxes], own[args.cache_boxes:][:100]
        wrong = other[torch.randperm(len(other), generator=torch.Generator().manual_seed(y))
                      [:100]]
        cand = torch.cat([good, wrong])
        _, cache_f = head_factors(backend.head_losses, pooled[cache_rows], labels[cache_rows],
                                  layers)
        as_y = torch.full((len(cand),), y, dtype=torch.int64)
        _, cand_f = head_factors(backend.head_losses, pooled[cand], as_y, layers)
        exact = _exact_cosines(cache_f, cand_f)
        sketch = SketchedClassCaches(rank=args.rank)
        sketch.set_basis(basis)
        sketch.update(y, cache_f)
        got = sketch.scores(y, cand_f)[0].numpy()
        is_good = np.r_[np.ones(len(good)), np.zeros(len(wrong))].astype(bool)
        rows.append({"class": y, "candidates": len(cand), "good": int(is_good.sum()),
                     "pearson": float(np.corrcoef(exact, got)[0, 1]),
                     "pearson_good": float(np.corrcoef(exact[is_good], got[is_good])[0, 1]),
                     "auc_exact": _auc(exact[is_good], exact[~is_good]),
                     "auc_sketch": _auc(got[is_good], got[~is_good])})
        log(f"(b) class {y}: Pearson {rows[-1]['pearson']:.5f} (good only "
            f"{rows[-1]['pearson_good']:.5f}), AUC {rows[-1]['auc_exact']:.3f} -> "
            f"{rows[-1]['auc_sketch']:.3f}")
    # The factor-based exact cosine against full flattened gradients, on a few candidates.
    y = int(classes[0])
    own = torch.nonzero(labels == y).flatten()
    cache_rows, cand = own[:args.cache_boxes], own[args.cache_boxes:args.cache_boxes + 5]
    params = backend.classifier_parameters()

    def grad(rows: torch.Tensor, label: int) -> torch.Tensor:
        loss = backend.head_losses(pooled[rows], torch.full((len(rows),), label)).mean()
        return flat(torch.autograd.grad(loss, params, allow_unused=True), params)

    full = ClassGradientCaches(params)
    full.update(y, grad(cache_rows, y))
    flat_cos = full.scores(y, [grad(cand[[k]], y) for k in range(len(cand))])[0].numpy()
    _, cache_f = head_factors(backend.head_losses, pooled[cache_rows], labels[cache_rows],
                              layers)
    _, cand_f = head_factors(backend.head_losses, pooled[cand],
                             torch.full((len(cand),), y), layers)
    check = float(np.abs(_exact_cosines(cache_f, cand_f) - flat_cos).max())
    log(f"(b) factor-based exact cosine vs flattened gradients: max |diff| {check:.2e}")
    return {"rank": args.rank, "cache_boxes": args.cache_boxes, "scene_size": args.scene_size,
            "rows": rows, "exact_check_max_abs_diff": check}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of ``pos`` above ``neg`` (ties half)."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# --------------------------------------------------------------------------- (c) step time


STEP_METHODS = {
    "plain": {"method": "accept_all"},
    "default_sketch_training_batch": {"granularity": "instance", "method": "composite",
                                      "keep_fraction": 0.7, "quality_gates": {"mask_score": 0.5}},
    "previous_exact_test_batch": {"granularity": "instance", "method": "composite",
                                  "keep_fraction": 0.7, "quality_gates": {"mask_score": 0.5},
                                  "cache_sketch": "none", "real_gradients": "test_batch"},
}


def part_step(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks._candidate_stream import real_cutouts
    from trainer.datasets import LvisDataset, write_builtin_dataset
    from trainer.factory import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        log(f"(c) writing the built-in set at {args.step_size} px")
        root = write_builtin_dataset(Path(tmp) / "b800", seed=0, num_train_images=200,
                                     num_val_images=12, image_size=args.step_size)
        ds = LvisDataset(root, "train.json")
        stream = real_cutouts(ds, 8 * (args.step_runs + 2) * 4, seed=1, prefix="s",
                              size=args.step_size // 4, wrong_fraction=0.4, mask_scores=True)
        training = {"arch": "resnet50_fpn", "image_size": args.step_size, "batch_size": 2,
                    "lr": 1e-4, "warmup_steps": 2, "steps": 100, "max_pastes_per_image": 4,
                    "device": "cpu"}
        trainers = {}
        for name, selection in STEP_METHODS.items():
            trainers[name] = build_trainer(ds, training=training, selection=selection, seed=0)
            log(f"(c) built {name}")
        seconds: dict[str, list[float]] = {n: [] for n in trainers}
        batches = _by_distinct_classes(stream, 8)
        names = list(trainers)
        for b, batch in enumerate(batches[:args.step_runs + 1]):
            shift = b % len(names)
            for name in names[shift:] + names[:shift]:
                result = trainers[name].train_on_candidates(batch)
                if b >= 1:  # the first step warms the allocator and the image cache
                    seconds[name].extend(s["seconds"] for s in result.steps)
                log(f"(c) batch {b} {name}: {[round(s['seconds'], 1) for s in result.steps]}")
    plain = statistics.median(seconds["plain"])
    return {"image_size": args.step_size, "threads": args.threads,
            "rows": [{"method": n, "steps": len(v), "median_s": statistics.median(v),
                      "ratio": statistics.median(v) / plain} for n, v in seconds.items()]}


def _by_distinct_classes(stream: list[dict[str, Any]], k: int) -> list[list[dict[str, Any]]]:
    """Batches of ``k`` candidates of ``k`` distinct classes where the stream allows."""
    pool = list(stream)
    out = []
    while len(pool) >= k:
        batch, seen = [], set()
        for row in list(pool):
            if int(row["class_id"]) not in seen:
                seen.add(int(row["class_id"]))
                batch.append(row)
                pool.remove(row)
            if len(batch) == k:
                break
        while len(batch) < k and pool:
            batch.append(pool.pop(0))
        out.append(batch)
    return out


# ----------------------------------------------------------------------------- (d) staleness


def lvis_shaped_images(seed: int = 0) -> tuple[list[set[int]], np.ndarray]:
    """Per-image class sets of an LVIS-shaped training set and each class's group letter:
    1203 classes, rare ones in 1-10 images, common 11-100, frequent 101-2,500 (log-uniform;
    about 3.5 classes per image, as in LVIS), spread over ~100 k images at random (an
    assumption: LVIS's real co-occurrence is not modelled)."""
    rng = np.random.default_rng(seed)
    groups = np.array(["r"] * LVIS_GROUPS["r"] + ["c"] * LVIS_GROUPS["c"]
                      + ["f"] * LVIS_GROUPS["f"])
    counts = np.where(groups == "r", rng.integers(1, 11, len(groups)),
                      np.where(groups == "c", np.exp(rng.uniform(np.log(11), np.log(100),
                                                                 len(groups))),
                               np.exp(rng.uniform(np.log(101), np.log(2_500), len(groups)))))
    images: list[set[int]] = [set() for _ in range(LVIS_IMAGES)]
    for cid, count in enumerate(counts.astype(np.int64), start=1):
        for i in rng.choice(LVIS_IMAGES, int(count), replace=False):
            images[int(i)].add(cid)
    return images, groups


def part_staleness(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.sampling import RepeatFactorSampler

    images, groups = lvis_shaped_images()
    log(f"(d) LVIS-shaped set: {len(images)} images, "
        f"{np.mean([len(s) for s in images]):.2f} classes per image")
    weights = np.array([{"r": 4.0, "c": 2.0, "f": 1.0}[g] for g in groups])
    weights /= weights.sum()
    rng = np.random.default_rng(5)
    results = {}
    for max_age in args.max_ages:
        sampler = RepeatFactorSampler(images, 0.001, seed=1)
        updated: dict[int, int] = {}
        reads = {"fresh": 0, "in_step": 0, "topped_up": 0, "stale": 0, "empty": 0}
        ages: dict[str, list[int]] = {"r": [], "c": [], "f": []}
        topups = []
        for step in range(args.sim_steps):
            in_step = set().union(*(images[i] for i in sampler.next_indices(2)))
            for cid in in_step:
                updated[cid] = step
            candidates = rng.choice(np.arange(1, LVIS_CLASSES + 1), 8, p=weights)
            want = []
            for cid in dict.fromkeys(int(c) for c in candidates):
                if cid in in_step:
                    continue
                age = None if cid not in updated else step - updated[cid]
                if age is None or age > max_age:
                    want.append((age is not None, -(age or 0), cid))
            chosen = {cid for _, _, cid in sorted(want)[:args.topup_images]}
            topups.append(len(chosen))
            for cid in chosen:
                updated[cid] = step
            for cid in (int(c) for c in candidates):
                g = groups[cid - 1]
                if cid in in_step:
                    reads["in_step"] += 1
                    ages[g].append(0)
                elif cid in chosen:
                    reads["topped_up"] += 1
                    ages[g].append(0)
                elif cid not in updated:
                    reads["empty"] += 1
                else:
                    age = step - updated[cid]
                    reads["stale" if age > max_age else "fresh"] += 1
                    ages[g].append(age)
        total = sum(reads.values())
        results[str(max_age)] = {
            "reads": {k: v / total for k, v in reads.items()},
            "topup_images_per_step": float(np.mean(topups)),
            "age_at_read": {g: {"median": float(np.median(v)) if v else None,
                                "p90": float(np.percentile(v, 90)) if v else None}
                            for g, v in ages.items()}}
        log(f"(d) cache_max_age {max_age}: {results[str(max_age)]}")
    return {"steps": args.sim_steps, "topup_images": args.topup_images, "by_max_age": results}


# ----------------------------------------------------------------------------------- report


def write_report(results: dict[str, Any], path: Path) -> None:
    lines = ["# Selection at LVIS scale (`benchmarks/lvis_scale.py`)", "",
             f"torch {torch.__version__}, CPU, {results['threads']} thread(s); no GPU was "
             "available, so no CUDA figure is reported.", ""]
    if "memory" in results:
        m = results["memory"]
        lines += ["## (a) Class-cache memory, ResNet-50 FPN heads, 1203 classes", "",
                  f"Exact: {m['exact_numbers_per_class']:,} numbers per class; sketched (rank "
                  f"8): {m['sketch_numbers_per_class']:,}.", "",
                  "| classes seen | exact (MiB) | exact, predicted | sketched (MiB) | "
                  "sketched, predicted |", "|---|---|---|---|---|"]
        lines += [f"| {r['classes']} | {r['exact_mib']:,.1f} | {r['exact_predicted_mib']:,.1f} | "
                  f"{r['sketch_mib']:,.2f} | {r['sketch_predicted_mib']:,.2f} |"
                  for r in m["rows"]]
        lines += [""]
    if "estimator" in results:
        e = results["estimator"]
        p = [r["pearson"] for r in e["rows"]]
        lines += [f"## (b) Sketched vs exact cosine (rank {e['rank']}, caches of "
                  f"{e['cache_boxes']} boxes, {e['scene_size']} px scenes)", "",
                  f"Per class over {e['rows'][0]['candidates']} candidates: Pearson min "
                  f"{min(p):.5f}, median {statistics.median(p):.5f}. The factor-based exact "
                  f"cosine equals the flattened-gradient one to {e['exact_check_max_abs_diff']:.1e}.",
                  "", "| class | Pearson | Pearson, good only | AUC exact | AUC sketched |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['pearson']:.5f} | {r['pearson_good']:.5f} | "
                  f"{r['auc_exact']:.3f} | {r['auc_sketch']:.3f} |" for r in e["rows"]]
        lines += [""]
    if "step" in results:
        s = results["step"]
        lines += [f"## (c) Step time at {s['image_size']} px, CPU ({s['threads']} thread(s)), "
                  "2 real images + 8 candidates of 8 classes", "",
                  "| method | steps | median s/step | x plain |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['steps']} | {r['median_s']:.2f} | {r['ratio']:.2f} |"
                  for r in s["rows"]]
        lines += [""]
    if "staleness" in results:
        d = results["staleness"]
        lines += [f"## (d) Cache age at read, LVIS-shaped stream ({d['steps']} steps, 2 images "
                  f"per step, top-up of at most {d['topup_images']} images)", "",
                  "| cache_max_age | in the step's images | topped up | fresh (≤ max age) | "
                  "stale (> max age) | empty | top-up images/step | median age r / c / f |",
                  "|---|---|---|---|---|---|---|---|"]
        for age, r in d["by_max_age"].items():
            f = r["reads"]
            med = " / ".join("–" if r["age_at_read"][g]["median"] is None else
                             f"{r['age_at_read'][g]['median']:.0f}" for g in ("r", "c", "f"))
            lines.append(f"| {age} | {f['in_step']:.1%} | {f['topped_up']:.1%} | "
                         f"{f['fresh']:.1%} | {f['stale']:.1%} | {f['empty']:.1%} | "
                         f"{r['topup_images_per_step']:.2f} | {med} |")
        lines += [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b,c,d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--classes", type=int, default=8, help="(b) evaluated classes")
    parser.add_argument("--cache-boxes", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=48, help="(b) evaluation scenes")
    parser.add_argument("--basis-scenes", type=int, default=8)
    parser.add_argument("--scene-size", type=int, default=512)
    parser.add_argument("--step-size", type=int, default=800)
    parser.add_argument("--step-runs", type=int, default=5)
    parser.add_argument("--sim-steps", type=int, default=20_000)
    parser.add_argument("--max-ages", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--topup-images", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "lvis_scale"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(
        ".json").exists() else {}
    results: dict[str, Any] = {**previous, "threads": args.threads}
    for key, name, fn in (("a", "memory", lambda: part_memory()),
                          ("b", "estimator", lambda: part_estimator(args)),
                          ("c", "step", lambda: part_step(args)),
                          ("d", "staleness", lambda: part_staleness(args))):
        if key in parts:
            started = time.perf_counter()
            results[name] = fn()
            log(f"part ({key}) {name} took {time.perf_counter() - started:.0f} s")
            out.with_suffix(".json").write_text(json.dumps(results, indent=1))
            write_report(results, out.with_suffix(".md"))
    return results


if __name__ == "__main__":
    main()

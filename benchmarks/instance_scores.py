"""What makes a per-instance contribution score informative: a study at fixed pretrained weights.

For ``--batches`` pasted batches of a seed's candidate stream (failures included), at the seed's
pretrained weights (no training between batches; the gradient caches move on from batch to batch
as in a run), every generated instance k gets:

- ``loss``: minus its box-classifier cross-entropy on its own ground-truth box;
- exact per-instance gradients of that loss over all trainable parameters (K backwards), dotted
  with real-data gradients: of all the real "test" batch's classes (``all``) or of the
  instance's own class only (``class``), this batch's (``now``) or a momentum-0.1 cache
  (``momentum``) or a running average (``average``); as a cosine or a dot; over all parameters
  or over the box head + predictor only (``heads``);
- the same own-class average cache fed from uniformly drawn real images instead of images
  chosen to contain the candidates' classes (``class_average_uniform_draw``);
- the central-difference estimate of the dot with the all-classes momentum cache and with its
  own class's cache (one direction per class present), checked against the exact dots (Pearson);
- the annotator's ``mask_score``.

It prints ROC AUC (good vs failed, and good vs each failure kind) of every score, the Pearson
correlation of each estimator with the exact score, and Spearman rank agreement of the
head-only score with the all-parameter one. Nothing here decides anything: the generator's truth
only judges.

Usage: ``PYTHONPATH=. python benchmarks/instance_scores.py --work-dir /tmp/sq/work --seed 100``
(needs the seed's data, stream and pretrained checkpoint from ``selection_quality.py
--work-dir``; about 3-6 min for 60 batches on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


from benchmarks._candidate_stream import roc_auc as auc


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def probe(work: Path, seed: int, batches_wanted: int, eps: float) -> dict[str, Any]:
    import torch

    from benchmarks._candidate_stream import batches, load_stream
    from benchmarks._method_runs import RunJob, build_finetune_trainer
    from benchmarks.selection_quality import FULL, with_candidates
    from benchmarks._score_probes import _candidates
    from selector import GradientCache
    from trainer.instance_scores import (
        directional_dots,
        exact_gradients,
        flat,
        generated_instances,
    )
    from trainer.real_data import pasted_inputs, real_inputs

    job = RunJob(data_root=str(work / "data"), seed=seed, sizes=with_candidates(FULL),
                 checkpoint=str(work / f"seed{seed}_pretrained.pt"))
    stream = load_stream(work / f"seed{seed}_stream.npz")
    truth = dict(zip(stream["sample_id"].tolist(), stream["truth_failure"].tolist()))
    trainer = build_finetune_trainer(job, {"method": "bsgal", "mode": "faithful",
                                           "threshold": "fixed"})
    backend = trainer.backend
    params = backend.trainable_parameters()
    heads = {id(p) for p in backend.classifier_parameters()}
    head_mask = torch.cat([torch.full((p.numel(),), id(p) in heads) for p in params])
    buffers = list(backend.module.buffers())
    caches: dict[str, Any] = {}

    def cache(name: str, mode: str) -> Any:
        if name not in caches:
            caches[name] = GradientCache(params, mode=mode, momentum=0.1)
        return caches[name]

    draw = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    fidelity: dict[str, list[tuple[float, float]]] = defaultdict(list)
    seconds = {"exact": 0.0, "directional": 0.0, "plain_forward_backward": 0.0}
    for j, batch in enumerate(batches(stream, 8)):
        if j >= batches_wanted:
            break
        pool = _candidates(trainer, batch)
        while pool:
            pasted = trainer.paste_next(pool)
            inst = generated_instances(pasted.pasted)
            if not len(inst):
                continue
            images, targets = pasted_inputs(pasted.pasted, backend.device)
            real_images, real_targets = real_inputs(pasted.real_test, backend.device)
            # real gradients: all classes, and per class present in the real "test" batch
            real_losses = backend.gt_box_losses(real_images, real_targets)
            real_labels = torch.cat([t["labels"] for t in real_targets])
            now_all = flat(torch.autograd.grad(real_losses.mean(), params, retain_graph=True,
                                               allow_unused=True), params)
            now_class = {}
            for label in sorted(set(inst.labels.tolist())):
                picked = real_labels == label
                if picked.any():
                    now_class[label] = flat(torch.autograd.grad(
                        real_losses[picked].mean(), params, retain_graph=True,
                        allow_unused=True), params)
            del real_losses
            # how the real batch is drawn: the same number of uniformly random real images
            # (not chosen to contain the candidates' classes) feeding their own class caches
            uniform = [trainer.real[int(i)] for i in draw.integers(0, len(trainer.real),
                                                                   len(pasted.real_test))]
            u_images, u_targets = real_inputs(uniform, backend.device)
            u_losses = backend.gt_box_losses(u_images, u_targets)
            u_labels = torch.cat([t["labels"] for t in u_targets])
            for label in sorted(set(inst.labels.tolist())):
                picked = u_labels == label
                if picked.any():
                    cache(f"uniform{label}_average", "average").update(flat(torch.autograd.grad(
                        u_losses[picked].mean(), params, retain_graph=True, allow_unused=True),
                        params))
            del u_losses
            cache("all_momentum", "momentum").update(now_all)
            cache("all_average", "average").update(now_all)
            for label, g in now_class.items():
                cache(f"class{label}_momentum", "momentum").update(g)
                cache(f"class{label}_average", "average").update(g)
            started = time.perf_counter()
            losses = backend.gt_box_losses(images, targets)[torch.as_tensor(inst.rows)]
            grads = exact_gradients(losses, params)
            seconds["exact"] += time.perf_counter() - started
            norms_all = torch.linalg.vector_norm(grads, dim=1)
            norms_heads = torch.linalg.vector_norm(grads[:, head_mask], dim=1)
            # the default's own path (trainer.instance_step, score_parameters=heads): pooled
            # RoI features without gradient, then a backward through the heads only
            head_params = backend.classifier_parameters()
            pooled = backend.gt_box_head_inputs(images, targets)[torch.as_tensor(inst.rows)]
            fast = exact_gradients(backend.head_losses(
                pooled, torch.as_tensor(inst.labels)), head_params)
            directions = {
                "all_now": now_all,
                "all_momentum": caches["all_momentum"].buffer.float(),
                "all_average": caches["all_average"].buffer.float(),
            }
            started = time.perf_counter()

            def instance_losses() -> Any:
                return backend.gt_box_losses(images, targets)[torch.as_tensor(inst.rows)]

            cd_all = directional_dots(instance_losses, params, directions["all_momentum"],
                                      eps=eps, buffers=buffers)
            seconds["directional"] += time.perf_counter() - started
            cd_class = {}
            for label in sorted(set(inst.labels.tolist())):
                key = f"class{label}_momentum"
                if key in caches:
                    cd_class[label] = directional_dots(instance_losses, params,
                                                       caches[key].buffer.float(), eps=eps,
                                                       buffers=buffers)
            started = time.perf_counter()
            split = backend.losses(images, targets, score_only=True)
            torch.stack(list(split.stock.values())).sum().backward()
            trainer.optimizer.zero_grad(set_to_none=True)
            seconds["plain_forward_backward"] += time.perf_counter() - started
            for k in range(len(inst)):
                label = int(inst.labels[k])
                c = next(c for c in pasted.candidates if c.position == inst.positions[k])
                row = {"batch": j, "label": label, "kind": truth[c.sample_id],
                       "mask_score": float(c.fields.get("mask_score", np.nan)),
                       "loss": -float(losses[k].detach())}
                g = grads[k]
                for name, d in directions.items():
                    dot = float(g @ d)
                    dot_h = float(g[head_mask] @ d[head_mask])
                    row[f"dot_{name}"] = dot
                    row[f"cos_{name}"] = dot / max(float(norms_all[k]) * float(d.norm()), 1e-30)
                    row[f"cos_heads_{name}"] = dot_h / max(
                        float(norms_heads[k]) * float(d[head_mask].norm()), 1e-30)
                own = {"class_now": now_class.get(label)}
                key = f"class{label}_momentum"
                own["class_momentum"] = caches[key].buffer.float() if key in caches else None
                key = f"class{label}_average"
                own["class_average"] = caches[key].buffer.float() if key in caches else None
                key = f"uniform{label}_average"
                own["class_average_uniform_draw"] = (caches[key].buffer.float() if key in caches
                                                     else None)
                for name, d in own.items():
                    if d is None:
                        row[f"cos_{name}"] = row[f"cos_heads_{name}"] = row[f"dot_{name}"] = \
                            np.nan
                        continue
                    dot = float(g @ d)
                    row[f"dot_{name}"] = dot
                    row[f"cos_{name}"] = dot / max(float(norms_all[k]) * float(d.norm()), 1e-30)
                    row[f"cos_heads_{name}"] = float(g[head_mask] @ d[head_mask]) / max(
                        float(norms_heads[k]) * float(d[head_mask].norm()), 1e-30)
                fidelity["all_momentum"].append((row["dot_all_momentum"], float(cd_all[k])))
                fidelity["heads_path"].append((float(g[head_mask] @ g[head_mask]),
                                               float(fast[k] @ g[head_mask])))
                if label in cd_class and own["class_momentum"] is not None:
                    fidelity["class_momentum"].append((row["dot_class_momentum"],
                                                       float(cd_class[label][k])))
                rows.append(row)
    rare = sorted(c.label for c in trainer.train_set.categories if c.frequency == "r")
    return {"seed": seed, "eps": eps, "rows": rows, "seconds": seconds, "rare_labels": rare,
            "fidelity": {k: v for k, v in fidelity.items()}}


def summarise(result: dict[str, Any]) -> str:
    rows = result["rows"]
    kinds = ["wrong_class", "broken", "clutter", "noise"]
    scores = [k for k in rows[0] if k not in ("batch", "label", "kind")]
    lines = [f"seed {result['seed']}: {len(rows)} instances, "
             + ", ".join(f"{k} {sum(r['kind'] == k for r in rows)}"
                         for k in ["none", *kinds]), "",
             "| score | AUC good vs failed | " + " | ".join(kinds) + " | rare: good vs wrong |",
             "|---|---|" + "---|" * len(kinds) + "---|"]
    rare = set(result["rare_labels"])
    for s in scores:
        def vals(pred: Any) -> np.ndarray:
            v = np.array([r[s] for r in rows if pred(r)], float)
            return v[np.isfinite(v)]

        good = vals(lambda r: r["kind"] == "none")
        cells = [auc(good, vals(lambda r: r["kind"] != "none"))]
        cells += [auc(good, vals(lambda r, k=k: r["kind"] == k)) for k in kinds]
        cells.append(auc(vals(lambda r: r["kind"] == "none" and r["label"] in rare),
                         vals(lambda r: r["kind"] == "wrong_class" and r["label"] in rare)))
        lines.append(f"| {s} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines.append("")
    for name, pairs in result["fidelity"].items():
        a = np.array(pairs)
        if name == "heads_path":
            lines.append("the default's head-only path vs the heads' slice of the exact "
                         "all-parameter gradient, ⟨g, g_fast⟩ against ‖g‖²: Pearson "
                         f"{np.corrcoef(a[:, 0], a[:, 1])[0, 1]:.4f}, max relative gap "
                         f"{np.max(np.abs(a[:, 0] - a[:, 1]) / np.abs(a[:, 0])):.1e} over "
                         f"{len(a)} instances")
            continue
        lines.append(f"directional (ε={result['eps']:g}) vs exact dot, {name}: Pearson "
                     f"{np.corrcoef(a[:, 0], a[:, 1])[0, 1]:.4f} over {len(a)} instances")
    both = [(r["cos_class_momentum"], r["cos_heads_class_momentum"]) for r in rows
            if np.isfinite(r["cos_class_momentum"])]
    if both:
        a = np.array(both)
        lines.append(f"Spearman(heads-only cosine, all-parameter cosine), own-class cache: "
                     f"{spearman(a[:, 0], a[:, 1]):.3f}")
    a = np.array([(r["cos_all_momentum"], r["cos_heads_all_momentum"]) for r in rows])
    lines.append(f"Spearman(heads-only cosine, all-parameter cosine), all-class cache: "
                 f"{spearman(a[:, 0], a[:, 1]):.3f}")
    sec = result["seconds"]
    lines.append(f"time: exact per-instance {sec['exact']:.1f} s, directional (2 forwards) "
                 f"{sec['directional']:.1f} s, plain forward+backward "
                 f"{sec['plain_forward_backward']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="selection_quality.py's work folder "
                        "(the one holding data/, seed<N>_stream.npz, seed<N>_pretrained.pt)")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    result = probe(Path(args.work_dir), args.seed, args.batches, args.eps)
    if args.out:
        Path(args.out).write_text(json.dumps(result, default=float))
    print(summarise(result))


if __name__ == "__main__":
    main()

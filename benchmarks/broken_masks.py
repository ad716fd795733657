"""What catches broken-mask candidates? Each option's ROC AUC, good vs broken, and its cost.

At a seed's pretrained weights (benchmarks/threshold_sweep.py --work-dir), for ``--batches``
pasted batches of its 40 %-failure stream (the candidates pasted onto real images as in a
run), every generated instance k gets, with the generator's truth only judging:

- ``contribution``: the default score, the cosine of its box-classifier loss gradient (box
  head + predictor, exact) with its class's average cache of real boxes' gradients (the caches
  move on from batch to batch, fed by the real boxes of each batch's own images);
- ``box_loss``: minus its box-classifier cross-entropy on its own box;
- ``mask_loss``: minus the mask head's binary cross-entropy on its own mask for its own class
  (`TorchvisionMaskRCNN.gt_mask_losses`: how far the mask is from the shape the detector
  expects of the class in that box);
- ``mask_score``: the annotator's own mask score (the quality gate's field).

Printed and written (``--out``): per option, AUC good vs broken / wrong_class / clutter / noise
and the seconds it adds per batch (``contribution`` and ``box_loss`` share one forward).

    PYTHONPATH=. python benchmarks/broken_masks.py --work-dir /tmp/tsw/work --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._candidate_stream import FAILURE_RATES, GOOD, roc_auc

OPTIONS = ("contribution", "box_loss", "mask_loss", "mask_score")


def probe(work: Path, seed: int, batches_wanted: int, stream_name: str) -> dict[str, Any]:
    import torch

    from benchmarks._candidate_stream import batches, load_stream
    from benchmarks._method_runs import RunJob, build_finetune_trainer
    from benchmarks._score_probes import _candidates
    from benchmarks.selection_quality import FULL, with_candidates
    from selector.instance_selector import ClassGradientCaches
    from trainer.instance_scores import exact_gradients, flat, generated_instances
    from trainer.real_data import pasted_inputs

    job = RunJob(data_root=str(work / "data"), seed=seed, sizes=with_candidates(FULL),
                 checkpoint=str(work / f"seed{seed}_pretrained.pt"))
    stream = load_stream(work / stream_name)
    truth = dict(zip(stream["sample_id"].tolist(), stream["truth_failure"].tolist()))
    trainer = build_finetune_trainer(job, {"method": "bsgal", "mode": "faithful",
                                           "threshold": "fixed"})
    backend = trainer.backend
    params = backend.classifier_parameters()
    caches = ClassGradientCaches(params, mode="average")
    rows: list[dict[str, Any]] = []
    seconds = {"box_pass": 0.0, "mask_loss": 0.0}
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
            started = time.perf_counter()
            pooled = backend.gt_box_head_inputs(images, targets)
            labels = torch.cat([t["labels"] for t in targets])
            generated = torch.cat([t["generated"] for t in targets]).bool()
            with torch.enable_grad():
                losses = backend.head_losses(pooled, labels)
                for label in sorted(set(labels[~generated].tolist())):
                    chosen = (~generated) & (labels == label)
                    caches.update(int(label), flat(torch.autograd.grad(
                        losses[chosen].mean(), params, retain_graph=True, allow_unused=True),
                        params))
                grads = exact_gradients(losses[torch.as_tensor(inst.rows)], params)
            seconds["box_pass"] += time.perf_counter() - started
            started = time.perf_counter()
            mask_losses = backend.gt_mask_losses(images, targets)[torch.as_tensor(inst.rows)]
            seconds["mask_loss"] += time.perf_counter() - started
            for k in range(len(inst)):
                label = int(inst.labels[k])
                c = next(c for c in pasted.candidates if c.position == inst.positions[k])
                scored = caches.scores(label, grads[k:k + 1])
                rows.append({
                    "kind": truth[c.sample_id],
                    "contribution": float(scored[0][0]) if scored is not None else np.nan,
                    "box_loss": -float(losses[int(inst.rows[k])].detach()),
                    "mask_loss": -float(mask_losses[k]),
                    "mask_score": float(c.fields.get("mask_score", np.nan)),
                })
    return {"rows": rows, "seconds": seconds, "batches": min(batches_wanted, j + 1)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    kinds = np.array([r["kind"] for r in rows])
    out = {}
    for option in OPTIONS:
        values = np.array([r[option] for r in rows], dtype=float)
        finite = np.isfinite(values)
        good = values[(kinds == GOOD) & finite]
        out[option] = {kind: roc_auc(good, values[(kinds == kind) & finite])
                       for kind in FAILURE_RATES}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="threshold_sweep.py's --work-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", default=None, help="stream file in the work dir (default "
                        "seed<S>_r40.npz)")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args()
    from benchmarks._method_runs import one_thread

    one_thread()
    started = time.perf_counter()
    result = probe(Path(args.work_dir), args.seed, args.batches,
                   args.stream or f"seed{args.seed}_r40.npz")
    auc = summarise(result["rows"])
    counts = {k: sum(r["kind"] == k for r in result["rows"]) for k in (GOOD, *FAILURE_RATES)}
    per_batch = {k: v / max(result["batches"], 1) for k, v in result["seconds"].items()}
    lines = [f"# Broken masks: what separates them (seed {args.seed}, {result['batches']} "
             f"batches, {len(result['rows'])} instances: " + ", ".join(
                 f"{k} {v}" for k, v in counts.items()) + ")", "",
             "ROC AUC of each option (higher = good candidates score higher), at the "
             "pretrained weights:", "",
             "| option | " + " | ".join(f"good vs {k}" for k in FAILURE_RATES) + " |",
             "|---|" + "---|" * len(FAILURE_RATES)]
    for option, per in auc.items():
        lines.append(f"| {option} | " + " | ".join(f"{per[k]:.2f}" for k in FAILURE_RATES)
                     + " |")
    lines += ["", "Seconds per batch: box-classifier pass (contribution and box_loss) "
              f"{per_batch['box_pass']:.3f}, mask-head loss {per_batch['mask_loss']:.3f} (its "
              "own backbone forward here; in a step it would share the scoring forward's); "
              f"mask_score: free (the annotator's). Wall {time.perf_counter() - started:.0f} s."]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(
            {"auc": auc, "counts": counts, "seconds_per_batch": per_batch,
             "seed": args.seed, "batches": result["batches"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Cost of a training step: plain copy-paste vs faithful BSGAL vs efficient BSGAL, side by side.

On the CPU configuration (small Mask R-CNN, 128 px, built-in long-tailed set):

1. **Cost.** Three trainers start from the same weights and eat the same candidate stream;
   their steps are interleaved batch by batch (the order rotates) so that machine load hits all
   three alike. "plain" is copy-paste training without selection (accept-all: one
   forward+backward on the pasted batch). Reported: median seconds per step (pasting and image
   loading included) and the ratio to plain.
2. **Agreement.** One faithful run (after some real-only warm-up steps); at every step, before
   it trains, the efficient rule scores the *same* pasted batch with the *same* weights (its own
   gradient cache, fed with its own real part), and so does faithful mode a second time with a
   re-drawn real "test" batch and RoI sample: the agreement of faithful mode with itself is the
   ceiling for any rule. Reported: how often each accepts/rejects like the faithful run with
   the fixed threshold (−0.05) and with dynamic thresholds (keep 50 %, each rule over its own
   score history), and the correlation of the scores.

Targets (issue 4): efficient ≤ 1.7× plain; agreement ≥ 90 %.

The candidate stream is made of real instances cut out of training images (good candidates) and,
for a fraction of them, the same cut-outs labelled with a wrong class (bad candidates), so that
there is something to reject.

    PYTHONPATH=. python benchmarks/step_cost.py [--steps 24] [--agreement-steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._candidate_stream import real_cutouts


def build(ds: Any, method: str, mode: str, args: argparse.Namespace, **selection: Any):
    from trainer.factory import build_trainer

    training = {"arch": "small", "batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 10,
                "steps": 200, "max_pastes_per_image": 3, "device": "cpu"}
    return build_trainer(ds, training=training,
                         selection={"method": method, "mode": mode, **selection}, seed=0)


def measure_cost(ds: Any, stream: list[dict[str, Any]], args: argparse.Namespace
                 ) -> dict[str, list[float]]:
    trainers = {"plain": build(ds, "accept_all", "faithful", args),
                "faithful": build(ds, "bsgal", "faithful", args),
                "efficient": build(ds, "bsgal", "efficient", args)}
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    per_batch = args.batch_size  # about one step per candidate batch
    batches = [stream[i:i + per_batch] for i in range(0, len(stream), per_batch)]
    for b, batch in enumerate(batches):
        order = names[b % 3:] + names[:b % 3]
        for name in order:
            result = trainers[name].train_on_candidates(batch)
            if b >= 2:  # the first batches warm the image cache and the allocator
                seconds[name].extend(s["seconds"] for s in result.steps)
        if min(len(v) for v in seconds.values()) >= args.steps:
            break
    return seconds


def measure_agreement(ds: Any, stream: list[dict[str, Any]], args: argparse.Namespace
                      ) -> list[dict[str, tuple[str, float]]]:
    """Per step, (reason, score) of: the faithful run, the efficient rule on the same batch and
    weights, and faithful mode again with its real "test" batch and RoI samples re-drawn."""
    from selector import build_selector
    from trainer.bsgal_step import BsgalStep
    from trainer.candidates import check_candidate, cut_out

    trainer = build(ds, "bsgal", "faithful", args)
    for _ in range(args.agreement_warmup):
        trainer.train_real_step()
    backend = trainer.backend
    efficient = BsgalStep(backend, build_selector(backend.classifier_parameters(),
                                                  method="bsgal"), "efficient")
    redrawn = BsgalStep(backend, build_selector(backend.trainable_parameters(),
                                                method="bsgal"), "faithful")
    pool = [cut_out(i, r, trainer.label_of[r["class_id"]]) for i, r in enumerate(stream)
            if check_candidate(r, trainer.label_of) is None]
    steps = []
    while pool and len(steps) < args.agreement_steps:
        batch = trainer.paste_next(pool)
        eff = efficient.run(trainer.step, batch.pasted, class_ids=batch.class_ids)
        other_test = [trainer.real[i] for i in trainer.test_sampler.sample(
            batch.class_ids, trainer.real_batch_size)]
        again = redrawn.run(trainer.step, batch.pasted, other_test, class_ids=batch.class_ids)
        faithful, _ = trainer.train_pasted(batch)  # zeroes the shadows' gradients first
        steps.append({"faithful": (faithful.reason, faithful.score),
                      "efficient": (eff.reason, eff.score),
                      "faithful_redrawn": (again.reason, again.score)})
    return steps


def dynamic_decisions(scores: list[float], keep: float = 0.5, window: int = 1000) -> list[bool]:
    from selector import DynamicPercentileThreshold

    policy = DynamicPercentileThreshold(keep, window=window)
    return [policy.decide(s, step=i).accepted for i, s in enumerate(scores)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="built-in set folder (default: written to a temp dir)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per mode")
    parser.add_argument("--agreement-steps", type=int, default=60)
    parser.add_argument("--agreement-warmup", type=int, default=40,
                        help="real-only steps before the agreement run (the reference starts "
                             "from a trained detector)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wrong-fraction", type=float, default=0.4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    from trainer.datasets import LvisDataset, write_builtin_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else write_builtin_dataset(
            Path(tmp) / "builtin", seed=0, num_train_images=240, num_val_images=20)
        ds = LvisDataset(root, "train.json")
        count = 12 * args.batch_size * (args.steps + args.agreement_steps)
        stream = real_cutouts(ds, count, seed=1, prefix="b", wrong_fraction=args.wrong_fraction)
        started = time.perf_counter()
        seconds = measure_cost(ds, stream, args)
        cost_time = time.perf_counter() - started
        pairs = measure_agreement(ds, stream[len(stream) // 2:], args)

    plain = statistics.median(seconds["plain"])
    passes = {"plain": "1 fwd + 1 bwd", "faithful": "3 fwd + 3 bwd",
              "efficient": "1 fwd + 1 bwd + 2 head-only bwd"}
    print(f"Step cost, CPU configuration (small Mask R-CNN, 128 px, batch {args.batch_size}, "
          f"{args.threads} thread(s), torch {torch.__version__}); {cost_time:.0f} s")
    print(f"{'mode':<10} {'steps':>5} {'median s/step':>14} {'mean s/step':>12} "
          f"{'x plain':>8}  passes")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<10} {len(values):>5} {median:>14.3f} {statistics.mean(values):>12.3f} "
              f"{median / plain:>8.2f}  {passes[name]}")
    scored = ("accepted", "rejected_score")
    valid = [p for p in pairs if all(p[k][0] in scored for k in p)]
    print()
    print(f"Decision agreement with the faithful run, same weights and pasted batches "
          f"({len(valid)} scored steps of {len(pairs)}, after {args.agreement_warmup} real-only "
          "steps):")
    print(f"{'rule':<17} {'fixed -0.05':>11} {'dynamic 50%':>11} {'score corr':>10} "
          f"{'accept rate':>11}")
    reference = [p["faithful"][1] for p in valid]
    ref_dynamic = dynamic_decisions(reference)
    agreement = {}
    for rule in ("faithful", "efficient", "faithful_redrawn"):
        scores = [p[rule][1] for p in valid]
        fixed = np.mean([(a >= -0.05) == (b >= -0.05) for a, b in zip(scores, reference)])
        dynamic = np.mean([a == b for a, b in zip(dynamic_decisions(scores), ref_dynamic)])
        corr = float(np.corrcoef(scores, reference)[0, 1]) if len(valid) > 2 else float("nan")
        accept = np.mean([p[rule][0] == "accepted" for p in valid])
        agreement[rule] = fixed
        print(f"{rule:<17} {100 * fixed:>10.1f}% {100 * dynamic:>10.1f}% {corr:>10.3f} "
              f"{100 * accept:>10.0f}%")
    print("(faithful_redrawn: faithful mode again on the same batch with another real 'test' "
          "batch and RoI sample: the agreement any rule can expect)")
    print(f"targets: efficient <= 1.7x plain -> "
          f"{statistics.median(seconds['efficient']) / plain:.2f}x; agreement >= 90 % -> "
          f"{100 * agreement['efficient']:.1f} %")


if __name__ == "__main__":
    main()

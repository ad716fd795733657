"""Thresholds against the generator's failure rate: does the calibrated threshold lose nothing
with a good generator and filter hard with a bad one?

The protocol of benchmarks/selection_quality.py (built-in set, one real-only pretrained start
per seed, every method fine-tuned from it for the same steps on the same candidate stream),
with the generator's failure rate swept: per rate r, the stream's failures are r split equally
over wrong_class, broken, clutter and noise. Per rate and seed:

- accept-all (X-Paste style);
- the composite (quality gate, then the BSGAL contribution against its class's sketched cache)
  with the per-class percentile (keep 70 % of each class's candidates of the last 100 steps:
  the previous default);
- the composite with the calibrated threshold (alpha = 0.1: reject a candidate below the
  conformal 10 % lower bound of the scores of real instances of its class);
- the oracle reference: accept-all on good candidates only. The good candidates of every rate
  are drawn the same way, so the oracle runs once per seed on the 0 % stream (where accept-all
  is the oracle) and is the reference at every rate.

Reported per rate: segm APr (mean ± std), the paired difference against accept-all, the share
of good candidates accepted, the share of good candidates the *threshold* rejected (of those
that reached it: the calibrated threshold's alpha bound is about these), failures accepted by
kind, and the share the percentile kept over the run and per half of it (it should keep 70 %).

Choices: alpha = 0.1 is the target rate, not tuned (the issue asks for >= 90 % of good kept);
the calibrated threshold's window (100 steps), minimum reference (10 real scores) and real
pieces per step (4) are the config defaults, not tuned on any seed; the percentile's 0.7 was
chosen on seed 100 before (benchmarks/results/tuning_seed100_instance.md). Seeds 0-4; none of
them was used for a choice. The selectors never read the truth columns
(benchmarks/_method_runs.py drops them).

    PYTHONPATH=. python benchmarks/threshold_sweep.py                  # ~55 min on 2 cores
    PYTHONPATH=. python benchmarks/threshold_sweep.py --quick          # ~3 min, tiny sizes

Writes ``benchmarks/results/threshold_sweep.{md,json}`` (``--quick``: a temporary folder
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._candidate_stream import FAILURE_RATES, make_candidate_stream, save_stream
from benchmarks._method_runs import MethodSpec, RunJob, finetune, one_thread, pretrain
from benchmarks.selection_quality import (
    FULL,
    QUICK,
    Task,
    log,
    machine,
    run_tasks,
    with_candidates,
)

RATES = (0.0, 0.4, 0.7)
SEEDS = (0, 1, 2, 3, 4)
GATES = {"mask_score": 0.8}
COMPOSITE = {"granularity": "instance", "method": "composite", "quality_gates": GATES,
             "threshold_window_steps": 100}
METHODS = (
    MethodSpec("accept_all", "accept-all", {"method": "accept_all"}),
    MethodSpec("percentile", "composite, per-class percentile (keep 70 %)",
               {**COMPOSITE, "threshold": "dynamic", "keep_fraction": 0.7}),
    MethodSpec("calibrated", "composite, calibrated (alpha 0.1)",
               {**COMPOSITE, "threshold": "calibrated", "alpha": 0.1}),
)
KINDS = tuple(FAILURE_RATES)


def failure_rates(rate: float) -> dict[str, float]:
    """``rate`` split equally over the generator's failure kinds."""
    return {kind: rate / len(KINDS) for kind in KINDS}


def rate_key(rate: float) -> str:
    return f"r{int(round(100 * rate)):02d}"


def prepare(work: Path, sizes: Any, seeds: list[int], rates: list[float]) -> dict[str, Any]:
    from trainer.datasets import write_builtin_dataset

    root = work / "data"
    if not (root / "val.json").exists():
        write_builtin_dataset(root, seed=0, num_train_images=sizes.train_images,
                              num_val_images=sizes.val_images)
    streams = {}
    for seed in seeds:
        for rate in rates:
            path = work / f"seed{seed}_{rate_key(rate)}.npz"
            if not path.exists():
                save_stream(path, make_candidate_stream(
                    root / "train.json", sizes.candidates, seed=seed,
                    run_id=f"threshold-sweep-{seed}-{rate_key(rate)}",
                    failure_rates=failure_rates(rate)))
            streams[(seed, rate)] = str(path)
    return {"data_root": str(root), "streams": streams}


def build(paths: dict[str, Any], sizes: Any, seeds: list[int], rates: list[float],
          work: Path) -> list[Task]:
    tasks = []
    cost = {"calibrated": 1.4, "percentile": 1.4}
    for seed in seeds:
        pre = f"pretrain/seed{seed}"
        base = RunJob(data_root=paths["data_root"], seed=seed, sizes=sizes,
                      checkpoint=str(work / f"seed{seed}_pretrained.pt"),
                      stream_path=paths["streams"][(seed, rates[0])])
        tasks.append(Task(pre, pretrain, lambda done, b=base: b, cost=10.0))
        for rate in rates:
            for spec in METHODS:
                job = dataclasses.replace(base, spec=spec,
                                          stream_path=paths["streams"][(seed, rate)])
                tasks.append(Task(f"{spec.name}/{rate_key(rate)}/seed{seed}", finetune,
                                  lambda done, j=job: j, (pre,), cost.get(spec.name, 1.0)))
    return tasks


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    return f"{np.mean(values):+.1f} ± {np.std(values):.1f}" if len(values) > 1 else \
        f"{values[0]:+.1f}"


def _level(values: list[float], pct: bool = False) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    scale = 100.0
    body = f"{scale * np.mean(values):.0f} ± {scale * np.std(values):.0f} %" if pct else \
        f"{scale * np.mean(values):.1f} ± {scale * np.std(values):.1f}"
    return body


def summarise(done: dict[str, dict[str, Any]], seeds: list[int], rates: list[float]
              ) -> dict[str, Any]:
    """Per rate and method: APr, paired Δ vs accept-all, acceptance by kind (lists over
    seeds)."""
    out: dict[str, Any] = {}
    oracle = {s: done[f"accept_all/{rate_key(0.0)}/seed{s}"] for s in seeds
              if f"accept_all/{rate_key(0.0)}/seed{s}" in done}
    for rate in rates:
        per: dict[str, Any] = {}
        for spec in METHODS:
            runs = {s: done[f"{spec.name}/{rate_key(rate)}/seed{s}"] for s in seeds}
            base = {s: done[f"accept_all/{rate_key(rate)}/seed{s}"] for s in seeds}
            apr = [100 * r["metrics"]["segm"]["APr"] for r in runs.values()]
            delta = [100 * (runs[s]["metrics"]["segm"]["APr"] - base[s]["metrics"]["segm"]["APr"])
                     for s in seeds]
            kinds = {kind: [r["selection"]["by_kind"][kind]["accepted_fraction"]
                            for r in runs.values()] for kind in ("none", *KINDS)}
            per[spec.name] = {
                "label": spec.label, "segm_APr": apr, "delta_APr_vs_accept_all": delta,
                "segm_AP": [100 * r["metrics"]["segm"]["AP"] for r in runs.values()],
                "accepted": kinds,
                "good_rejected_by_threshold": [
                    r["selection"]["by_kind"]["none"].get("rejected_by_threshold", math.nan)
                    for r in runs.values()],
                "kept_of_judged": [r["selection"].get("kept_of_judged", math.nan)
                                   for r in runs.values()],
                "kept_halves": [r["selection"].get("kept_of_judged_halves", {})
                                for r in runs.values()],
                "s_per_step": [r["s_per_step"] for r in runs.values()],
            }
        if oracle:
            base = {s: done[f"accept_all/{rate_key(rate)}/seed{s}"] for s in seeds}
            per["oracle"] = {
                "label": "oracle: accept-all on good candidates only (the 0 % stream)",
                "segm_APr": [100 * oracle[s]["metrics"]["segm"]["APr"] for s in oracle],
                "delta_APr_vs_accept_all": [100 * (oracle[s]["metrics"]["segm"]["APr"]
                                                   - base[s]["metrics"]["segm"]["APr"])
                                            for s in oracle]}
        out[rate_key(rate)] = per
    return out


def markdown(summary: dict[str, Any], rates: list[float]) -> list[str]:
    lines = ["| failures | method | segm APr | Δ segm APr vs accept-all (paired) | good accepted "
             "| good rejected by the threshold | " + " | ".join(f"{k} accepted" for k in KINDS)
             + " | kept of judged (1st / 2nd half) |",
             "|---|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for rate in rates:
        for name, row in summary[rate_key(rate)].items():
            apr = row["segm_APr"]
            if name == "oracle":
                lines.append(f"| {100 * rate:.0f} % | {row['label']} | "
                             f"{np.mean(apr):.1f} ± {np.std(apr):.1f} | "
                             f"{_mean_std(row['delta_APr_vs_accept_all'])} | 100 % | – | "
                             + " | ".join("0 %" for _ in KINDS) + " | – |")
                continue
            kinds = row["accepted"]
            halves = row["kept_halves"]
            first = [h.get("first_half", math.nan) for h in halves]
            second = [h.get("second_half", math.nan) for h in halves]
            kept = (f"{_level(row['kept_of_judged'], True)} ({_level(first, True)} / "
                    f"{_level(second, True)})" if name != "accept_all" else "–")
            failed = [_level(kinds[k], True) if rate > 0 else "–" for k in KINDS]
            lines.append(
                f"| {100 * rate:.0f} % | {row['label']} | {np.mean(apr):.1f} ± {np.std(apr):.1f}"
                f" | {_mean_std(row['delta_APr_vs_accept_all'])} | {_level(kinds['none'], True)}"
                f" | {_level(row['good_rejected_by_threshold'], True)} | " + " | ".join(failed)
                + f" | {kept} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--rates", type=float, nargs="+", help=f"default {list(RATES)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--work-dir")
    args = parser.parse_args()
    one_thread()
    sizes = with_candidates(QUICK if args.quick else FULL)
    seeds = list(args.seeds) if args.seeds else ([0] if args.quick else list(SEEDS))
    rates = sorted(set(args.rates or RATES) | {0.0})  # 0 %: the oracle reference
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="threshold_sweep_")) if args.quick
        else Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(
        prefix="threshold_sweep_work_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"seeds {seeds}, failure rates {rates}, {sizes.pretrain_steps} pretraining + "
        f"{sizes.finetune_steps} fine-tuning steps, {sizes.candidates} candidates per stream")
    paths = prepare(work, sizes, seeds, rates)
    log(f"streams ready ({time.perf_counter() - started:.0f} s)")
    done = run_tasks(build(paths, sizes, seeds, rates, work), args.workers)
    wall = time.perf_counter() - started
    summary = summarise(done, seeds, rates)
    command = "PYTHONPATH=. python benchmarks/threshold_sweep.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    info = machine()
    md = ["# Thresholds against the generator's failure rate" + (" (--quick)" if args.quick
                                                                 else ""), "",
          f"`{command}`; {info['cores']} cores ({info['cpu']}), torch {info['torch']}; wall "
          f"time {wall / 60:.1f} min; seeds {seeds}; per seed {sizes.pretrain_steps} real-only "
          f"pretraining steps, then {sizes.finetune_steps} fine-tuning steps per method on "
          f"{sizes.candidates} candidates (the selection-quality protocol). Failures split "
          "equally over wrong_class, broken, clutter, noise. ×100 / %, mean ± std over seeds; "
          "Δ paired by seed.", ""] + markdown(summary, rates)
    stem = "threshold_sweep" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    runs = {k: v for k, v in done.items()}
    (out / f"{stem}.json").write_text(json.dumps(
        {"command": command, "machine": info, "wall_s": wall, "seeds": seeds, "rates": rates,
         "sizes": dataclasses.asdict(sizes), "summary": summary, "runs": runs},
        indent=1, default=float) + "\n")
    print("\n".join(md))
    log(f"wrote {out / f'{stem}.md'}; total {wall / 60:.1f} min")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

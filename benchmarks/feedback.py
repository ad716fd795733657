"""Closed-loop generation against open loop at the same generation budget.

    PYTHONPATH=. python benchmarks/feedback.py            # 3 seeds, ~30 min on 2 cores
    PYTHONPATH=. python benchmarks/feedback.py --quick    # 1 seed, tiny sizes, ~3 min

The built-in generator is made to fail differently by class and by prompt: half of each
frequency group's classes ("hard") fail 70 % of the time, the others 10 %; of the three prompt
templates, one halves a class's failure rate and one multiplies it by 1.5 (capped at 100 %).
Failures keep the kinds of the selection benchmark (wrong class, broken, clutter, noise in
equal parts). Nothing but the generator knows this: every policy sees only the trainer's
accept/reject decisions.

Per seed: one real-only pretrained detector (800 steps, as benchmarks/selection_quality.py),
then per policy the same 300 fine-tuning steps with the demo's selection (instance composite)
on candidates generated *during* the run from the policy's allocation, until the generation
budget (candidates generated) is spent; the remaining steps train on real data only. The
allocation a batch is drawn with is the one from ``--lag`` candidate batches earlier (the
read-ahead of the Ray stream; docs/algorithm.md, Closed-loop generation, gives the lag
measured on Ray). Reported per policy: segm APr (paired with open loop by seed), accepted
instances per class group, candidates generated per accepted instance, the precision of what
was accepted (the generator's truth judges, never decides), and, at reduced budgets (940 and
1,260 candidates: 70 % and 94 % of the ~1,340 open loop uses in 300 steps), whether a policy
still reaches open loop's APr.

No parameter was tuned: the policies run with their defaults (floor 0.1, half-life 200
decisions, bandit temperature 0.1 and exploration 0.1, targets r 100 / c 60 / f 30), and the
policy run at reduced budgets (yield-aware classes with the template bandit) was fixed before
the first run. ``--reuse RESULTS.json`` keeps an earlier run's results and runs only what is
missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._candidate_stream import FAILURE_RATES, GOOD
from benchmarks._method_runs import RunJob, Sizes, _metrics, build_finetune_trainer, \
    method_specs, one_thread, pretrain
from benchmarks.selection_quality import FULL, Task, log, machine, run_tasks

SEEDS = (0, 1, 2)
#: The prompt options: X-Paste's, DiverGen's (the default) and the bare name.
TEMPLATES = ("a photo of a single {name}",
             "a photo of a single {name}, {definition}, in a white background",
             "{name}")
OPTION_FAILURE = (1.0, 0.5, 1.5)
HARD_RATE, EASY_RATE = 0.7, 0.1
#: policy name → feedback settings (generators.allocation.FeedbackSettings keywords).
POLICIES = {
    "open_loop": {},
    "yield_aware": {"policy": "yield_aware"},
    "deficit_stop": {"policy": "deficit", "stop_at_target": True},
    "bandit": {"template_policy": "bandit"},
    "yield_bandit": {"policy": "yield_aware", "template_policy": "bandit"},
}
#: Runs at reduced budgets: open loop and the policy fixed in advance. In 300 steps open loop
#: uses about 1,340 candidates (the steps, not the 1,800 budget, bound it), so the budgets are
#: 70 % (940) and 94 % (1,260) of what open loop really used.
REDUCED = ("open_loop", "yield_bandit")
REDUCED_BUDGETS = (940, 1260)
#: Name of the result files in --out (.md and .json).
RESULTS = "feedback"


@dataclasses.dataclass(frozen=True)
class LoopSizes:
    budget: int  # candidates generated at the full budget
    chunk: int  # candidates per generated batch (one allocation each)
    lag: int  # generated batches between an allocation and the batch drawn with it


FULL_LOOP = LoopSizes(budget=1800, chunk=8, lag=4)
QUICK_LOOP = LoopSizes(budget=120, chunk=8, lag=2)


def hard_classes(lvis_json: str) -> dict[int, float]:
    """Every other class of each frequency group (by id) fails HARD_RATE, the rest EASY_RATE."""
    cats = json.loads(Path(lvis_json).read_text())["categories"]
    out: dict[int, float] = {}
    for group in ("r", "c", "f"):
        ids = sorted(c["id"] for c in cats if c.get("frequency") == group)
        for k, cid in enumerate(ids):
            out[cid] = HARD_RATE if k % 2 == 0 else EASY_RATE
    return out


def closed_loop_run(job: RunJob) -> dict[str, Any]:
    """One policy at one budget, from the seed's pretrained detector."""
    import torch

    from annotators import QualityCheck, build_annotator
    from generators import PromptSampler
    from generators.allocation import DemandState, FeedbackSettings, allocate
    from generators.procedural import ProceduralGenerator

    one_thread()
    torch.manual_seed(job.seed)
    extra = job.extra
    loop: LoopSizes = LoopSizes(**extra["loop"])
    budget = int(extra["budget"])
    settings = FeedbackSettings(**POLICIES[extra["policy"]])
    lvis_json = str(Path(job.data_root) / "train.json")
    failure = hard_classes(lvis_json)
    sampler = PromptSampler.from_lvis_json(lvis_json, run_id=f"feedback-{job.seed}",
                                           seed=job.seed, templates=list(TEMPLATES),
                                           weighting="rare_boost")
    vocab = sampler.vocabulary
    generator = ProceduralGenerator(lvis_json=lvis_json, failure_rates=FAILURE_RATES,
                                    failure_by_class=failure,
                                    failure_by_option=list(OPTION_FAILURE))
    annotator, quality = build_annotator("builtin"), QualityCheck()
    state = DemandState([c.id for c in vocab], max(sampler.options_per_class),
                        settings.half_life)
    frequency = [c.frequency for c in vocab]
    base = sampler.base_weights * sampler.allowed
    composite = next(s for s in method_specs(0.8, 0.5, 0.7) if s.name == "instance_composite")
    trainer = build_finetune_trainer(job, composite.selection)
    history: list[Any] = []  # allocations, one per generated batch (for the lag)
    generated = 0
    rows: list[dict[str, Any]] = []  # one per generated candidate
    shares: list[dict[str, Any]] = []
    end = trainer.step + job.sizes.finetune_steps
    started = time.perf_counter()
    pool = None
    columns: dict[str, np.ndarray] = {}
    while trainer.step < end:
        if pool is None and generated < budget:
            history.append(allocate(state, base, frequency, sampler.options_per_class,
                                    settings))
            alloc = history[max(0, len(history) - 1 - loop.lag)]
            sampler.set_weights(alloc.weights)
            sampler.set_option_weights(alloc.option_probs)
            n = min(loop.chunk, budget - generated)
            batch = quality(annotator(generator(sampler.sample_batch(n, generated))))
            generated += n
            if len(history) % 10 == 1:
                w = alloc.weights / alloc.weights.sum()
                shares.append({"generated": generated, "shares": {
                    str(c.name): round(float(x), 4) for c, x in zip(vocab, w)}})
            # The trainer never sees the generator's truth.
            columns = {k: np.asarray(v) for k, v in batch.items()}
            seen = {k: v for k, v in columns.items() if not k.startswith("truth_")}
            pool = trainer.take_candidates(seen)
        if pool is not None and not pool.done:
            trainer.step_candidates(pool)
        elif pool is None:
            trainer.train_real_step()
        if pool is not None and pool.done:
            decisions = pool.decisions()
            accepted = [bool(d["accepted"]) for d in decisions]
            state.record(columns["class_id"], columns["prompt_option"], accepted)
            for i, d in enumerate(decisions):
                rows.append({"class_id": int(columns["class_id"][i]),
                             "option": int(columns["prompt_option"][i]),
                             "accepted": accepted[i], "reason": str(d["reason"]),
                             "truth": str(columns["truth_failure"][i])})
            pool = None
    wall = time.perf_counter() - started
    metrics = _metrics(trainer.evaluate())
    group_of = {c.id: c.frequency for c in vocab}
    acc = [r for r in rows if r["accepted"]]
    by_group = {g: sum(1 for r in acc if group_of[r["class_id"]] == g) for g in "rcf"}
    hard = {c for c, rate in failure.items() if rate == HARD_RATE}
    return {
        "seed": job.seed, "policy": extra["policy"], "budget": budget, "metrics": metrics,
        "generated": generated, "decided": len(rows), "accepted": len(acc),
        "per_accepted": generated / max(1, len(acc)),
        "precision": (sum(r["truth"] == GOOD for r in acc) / len(acc)) if acc else math.nan,
        "good_generated": sum(r["truth"] == GOOD for r in rows) / max(1, len(rows)),
        "accepted_by_group": by_group,
        "generated_hard": sum(r["class_id"] in hard for r in rows),
        "accepted_hard": sum(r["class_id"] in hard for r in acc),
        "options": {str(t): sum(r["option"] == t for r in rows)
                    for t in range(len(TEMPLATES))},
        "accepted_by_class": {str(c.name): sum(r["class_id"] == c.id for r in acc)
                              for c in vocab},
        "shares": shares, "wall_s": wall,
    }


def _paired(results: dict[str, dict], policy: str, budget_key: str, seeds: list[int]
            ) -> tuple[float, float, list[float]]:
    diffs = [100 * (results[f"{policy}/{budget_key}/seed{s}"]["metrics"]["segm"]["APr"]
                    - results[f"open_loop/full/seed{s}"]["metrics"]["segm"]["APr"])
             for s in seeds]
    return float(np.mean(diffs)), float(np.std(diffs)), diffs


def report(results: dict[str, dict], seeds: list[int], sizes: Sizes, loop: LoopSizes,
           wall: float) -> str:
    def runs(policy: str, budget_key: str) -> list[dict]:
        return [results[f"{policy}/{budget_key}/seed{s}"] for s in seeds]

    def ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        v = np.asarray(values, float) * scale
        return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"

    lines = [
        "# Closed-loop generation (benchmarks/feedback.py)", "",
        f"Seeds {seeds}; {sizes.pretrain_steps} pretraining + {sizes.finetune_steps} "
        f"fine-tuning steps (instance composite, the demo's selection); full budget "
        f"{loop.budget} generated candidates (not binding: 300 steps use about 1,340), reduced "
        f"{', '.join(map(str, REDUCED_BUDGETS))}; batches of "
        f"{loop.chunk}, allocation lag {loop.lag} batches. Hard classes fail "
        f"{HARD_RATE:.0%}, easy {EASY_RATE:.0%}; prompt options multiply that by "
        f"{list(OPTION_FAILURE)} ({', '.join(repr(t) for t in TEMPLATES)}). "
        f"Wall time {wall / 60:.1f} min.", "",
        "| policy | budget | segm APr | Δ APr vs open loop (full) | per seed | accepted (r/c/f) "
        "| generated per accepted | precision | good generated | hard classes' share | "
        "options used |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in POLICIES:
        for key in ("full", *(f"b{b}" for b in REDUCED_BUDGETS)):
            if key != "full" and policy not in REDUCED:
                continue
            rs = runs(policy, key)
            apr = [r["metrics"]["segm"]["APr"] for r in rs]
            if policy == "open_loop" and key == "full":
                delta, per = "–", "–"
            else:
                m, s, d = _paired(results, policy, key, seeds)
                delta, per = f"{m:+.1f} ± {s:.1f}", ", ".join(f"{x:+.1f}" for x in d)
            groups = "/".join(f"{np.mean([r['accepted_by_group'][g] for r in rs]):.0f}"
                              for g in "rcf")
            hard = np.mean([r["generated_hard"] / max(1, r["decided"]) for r in rs])
            options = np.sum([[r["options"][str(t)] for t in range(len(TEMPLATES))]
                              for r in rs], axis=0)
            opt = "/".join(f"{100 * o / max(1, options.sum()):.0f}%" for o in options)
            lines.append(
                f"| {policy} | {rs[0]['budget']} (used "
                f"{np.mean([r['generated'] for r in rs]):.0f}) | {ms(apr, 100)} | {delta} | {per} | {groups} | "
                f"{ms([r['per_accepted'] for r in rs], 1, 2)} | "
                f"{ms([r['precision'] for r in rs], 100, 0)} % | "
                f"{ms([r['good_generated'] for r in rs], 100, 0)} % | {100 * hard:.0f} % | "
                f"{opt} |")
    lines += ["", "Accepted instances per class (mean over seeds, full budget):", "",
              "| class | " + " | ".join(POLICIES) + " |",
              "|---|" + "---|" * len(POLICIES)]
    names = list(results[f"open_loop/full/seed{seeds[0]}"]["accepted_by_class"])
    for name in names:
        cells = [f"{np.mean([r['accepted_by_class'][name] for r in runs(p, 'full')]):.0f}"
                 for p in POLICIES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    global REDUCED_BUDGETS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny sizes")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", help="keep data and checkpoints here (reused)")
    parser.add_argument("--lag", type=int, help="allocation lag in generated batches "
                        f"(default {FULL_LOOP.lag}; a closed-loop demo on Ray measured ~52: "
                        "416 candidates ahead)")
    parser.add_argument("--reduced-budgets", type=int, nargs="*",
                        help=f"reduced budgets for {', '.join(REDUCED)} (default "
                        f"{list(REDUCED_BUDGETS)}; none: no reduced runs)")
    parser.add_argument("--reuse", help="an earlier run's JSON: its runs are kept, only the "
                        "missing ones run (same sizes and seeds)")
    args = parser.parse_args()
    from benchmarks.selection_quality import QUICK, prepare_data

    sizes = QUICK if args.quick else FULL
    loop = QUICK_LOOP if args.quick else FULL_LOOP
    if args.lag is not None:
        loop = dataclasses.replace(loop, lag=args.lag)
    if args.reduced_budgets is not None:
        REDUCED_BUDGETS = tuple(args.reduced_budgets)
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    if args.policies:
        for name in [p for p in POLICIES if p not in args.policies and p != "open_loop"]:
            del POLICIES[name]
    import tempfile

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bsgal-feedback-"))
    work.mkdir(parents=True, exist_ok=True)
    earlier: dict[str, Any] = {}
    if args.reuse:
        earlier = {k.replace("/reduced/", "/b1260/"): v for k, v in
                   json.loads(Path(args.reuse).read_text())["results"].items()}
    started = time.perf_counter()
    paths = prepare_data(work, dataclasses.replace(sizes, candidates=8), [])
    tasks: list[Task] = []
    for seed in seeds:
        base = RunJob(data_root=paths["data_root"], seed=seed, sizes=sizes,
                      checkpoint=str(work / f"seed{seed}_pretrained.pt"))
        pre = f"pretrain/seed{seed}"
        tasks.append(Task(pre, pretrain, lambda done, b=base: b, cost=10.0))
        for policy in POLICIES:
            for key in ("full", *(f"b{b}" for b in REDUCED_BUDGETS)):
                if key != "full" and policy not in REDUCED:
                    continue
                if f"{policy}/{key}/seed{seed}" in earlier:
                    continue
                budget = loop.budget if key == "full" else int(key[1:])
                extra = {"policy": policy, "budget": budget,
                         "loop": dataclasses.asdict(loop)}
                tasks.append(Task(f"{policy}/{key}/seed{seed}", closed_loop_run,
                                  lambda done, b=base, e=extra: dataclasses.replace(b, extra=e),
                                  (pre,), 1.0))
    results = {**earlier, **run_tasks(tasks, args.workers)}
    wall = time.perf_counter() - started + float(
        json.loads(Path(args.reuse).read_text()).get("wall_s", 0) if args.reuse else 0)
    out = Path(args.out if not args.quick else work)
    out.mkdir(parents=True, exist_ok=True)
    text = report(results, seeds, sizes, loop, wall)
    (out / f"{RESULTS}.md").write_text(text)
    (out / f"{RESULTS}.json").write_text(json.dumps(
        {"machine": machine(), "seeds": seeds, "sizes": dataclasses.asdict(sizes),
         "loop": dataclasses.asdict(loop), "wall_s": wall, "results": results}, indent=1,
        default=float))
    print(text)
    log(f"wrote {out / RESULTS}.md")


if __name__ == "__main__":
    main()

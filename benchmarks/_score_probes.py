"""Scores measured without training: the noise experiment and the fidelity of the first-order
score, both at a seed's pretrained weights.

Each probe scores a pasted batch through the trainer's own step (`BsgalStep.run`, the code the
fine-tuning runs use), then throws the step's gradients away and puts the weights, BatchNorm
statistics, gradient cache, samplers and random generators back where they were, so that every
variant of a batch meets exactly the same state and the same paste layout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks._candidate_stream import GOOD, add_object_noise, batches, load_stream
from benchmarks._method_runs import RunJob, build_finetune_trainer, one_thread
from trainer.candidates import nan_if_none

BSGAL_FIXED = {"method": "bsgal", "score": "cosine", "cache_update": "momentum", "momentum": 0.1,
               "threshold": "fixed", "fixed_threshold": -0.05}
FIXED_THRESHOLD = -0.05
#: The batch-level scores probed (efficient mode was removed: see trainer.bsgal_step).
MODES = ("faithful",)


def _candidates(trainer: Any, batch: Mapping[str, np.ndarray]) -> list[Any]:
    """The valid candidates of a batch, cut out (truth columns are not passed on)."""
    from trainer.candidates import batch_rows, check_candidate, cut_out

    pool = []
    for position, row in enumerate(batch_rows(batch)):
        row = {k: v for k, v in row.items() if not k.startswith("truth_")}
        if check_candidate(row, trainer.label_of) is None:
            pool.append(cut_out(position, row, trainer.label_of[int(row["class_id"])]))
    return pool


def _score_once(trainer: Any, pool: list[Any]) -> tuple[float, str, list[Any]]:
    """Paste the next step's candidates from ``pool`` and score them like a training step, but
    without an optimizer step; returns (score, reason, pasted candidates)."""
    pasted = trainer.paste_next(pool)
    outcome = trainer.step_fn.run(trainer.step, pasted).verdict
    trainer.optimizer.zero_grad(set_to_none=True)
    return nan_if_none(outcome.score), outcome.reason, pasted.candidates


def noise_probe(job: RunJob) -> dict[str, Any]:
    """Score the same candidate batches at increasing object-noise levels (paper §5.1.1).

    ``job.extra["probe_stream"]``: a stream of good candidates (the generator without failures).
    For each of ``sizes.probe_batches`` batches and each mode (`MODES`), the state is
    snapshotted, then every noise level is scored from that snapshot (highest level first); the
    clean level's scoring is kept, so the gradient cache moves on from batch to batch as in a run
    (with no training in between).

    Returns:
        ``{"levels": [...], "rows": [{mode, batch, level, score, reason, num_candidates}]}``.
    """
    one_thread()
    sizes = job.sizes
    stream = load_stream(job.extra["probe_stream"])
    levels = sorted(sizes.noise_levels)
    trainers = {mode: build_finetune_trainer(job, {**BSGAL_FIXED, "mode": mode})
                for mode in MODES}
    rows: list[dict[str, Any]] = []
    for j, batch in enumerate(batches(stream, sizes.candidate_batch)):
        if j >= sizes.probe_batches:
            break
        noisy = {level: add_object_noise(batch, level, seed=job.seed * 100_003 + j)
                 for level in levels}
        for mode, trainer in trainers.items():
            snapshot = copy.deepcopy(trainer.state_dict())
            for n, level in enumerate(reversed(levels)):
                if n:
                    trainer.load_state_dict(copy.deepcopy(snapshot))
                score, reason, used = _score_once(trainer, _candidates(trainer, noisy[level]))
                rows.append({"mode": mode, "batch": j, "level": level, "score": score,
                             "reason": reason, "num_candidates": len(used)})
    return {"seed": job.seed, "levels": levels, "rows": rows}


def fidelity_probe(job: RunJob) -> dict[str, Any]:
    """The first-order batch score (faithful) against the exact look-ahead loss change.

    ``job.extra["fidelity_stream"]``: a stream with the generator's failures. For each of
    ``sizes.fidelity_batches`` pasted batches, at the pretrained weights: the faithful score
    (cosine to the cache fed by the real "test" batch) and ``selector.exact_lookahead_gain`` on
    the same pasted
    batch and the same real "test" batch for each step size in ``job.extra["alphas"]``. The
    torch generator is re-seeded identically before each, so RoI sampling matches.

    Returns:
        ``{"alphas": [...], "rows": [{batch, faithful, gain: {alpha: φ}, bad_fraction,
        num_candidates}]}``.
    """
    import torch

    from selector import exact_lookahead_gain
    from trainer.real_data import pasted_inputs, real_inputs

    one_thread()
    sizes = job.sizes
    alphas = [float(a) for a in job.extra["alphas"]]
    stream = load_stream(job.extra["fidelity_stream"])
    truth = dict(zip(stream["sample_id"].tolist(), stream["truth_failure"].tolist()))
    trainer = build_finetune_trainer(job, {**BSGAL_FIXED, "mode": "faithful"})
    backend = trainer.backend
    module = backend.module
    params = backend.trainable_parameters()
    rows: list[dict[str, Any]] = []
    for j, batch in enumerate(batches(stream, sizes.candidate_batch)):
        if len(rows) >= sizes.fidelity_batches:
            break
        pool = _candidates(trainer, batch)
        if not pool:
            continue
        pasted = trainer.paste_next(pool)
        if not any(p.num_generated for p in pasted.pasted):
            continue
        weights = copy.deepcopy(module.state_dict())
        rng_seed = job.seed * 1_000_003 + j

        def restore() -> None:
            trainer.optimizer.zero_grad(set_to_none=True)
            module.load_state_dict(weights)

        torch.manual_seed(rng_seed)
        faithful = trainer.step_fn.run(trainer.step, pasted).verdict
        restore()
        pasted_batch = pasted_inputs(pasted.pasted, backend.device)
        real_batch = real_inputs(pasted.real_test, backend.device)
        gains = {}
        for alpha in alphas:
            torch.manual_seed(rng_seed)
            result = exact_lookahead_gain(
                params,
                lambda: backend.losses(*pasted_batch, score_only=True).generated[
                    backend.classification_term],
                lambda: backend.real_classification_loss(*real_batch),
                lr=alpha, buffers=list(module.buffers()))
            gains[str(alpha)] = result.gain
        restore()
        bad = [truth[c.sample_id] != GOOD for c in pasted.candidates]
        rows.append({"batch": j, "faithful": nan_if_none(faithful.score),
                     "faithful_reason": faithful.reason,
                     "gain": gains,
                     "bad_fraction": float(np.mean(bad)), "num_candidates": len(bad)})
    return {"seed": job.seed, "alphas": alphas, "rows": rows}


# -- summaries ------------------------------------------------------------------------------


def dynamic_acceptance(scores: Sequence[float], keep_fraction: float, *, seed: int,
                       window: int = 1000) -> np.ndarray:
    """Decisions of the dynamic percentile threshold on ``scores`` presented in a shuffled order
    (a stream in which all noise levels are mixed); returned in the input order."""
    from selector import DynamicPercentileThreshold

    order = np.random.default_rng(seed).permutation(len(scores))
    policy = DynamicPercentileThreshold(keep_fraction, window=window)
    accepted = np.zeros(len(scores), dtype=bool)
    for step, i in enumerate(order):
        accepted[i] = policy.decide(float(scores[i]), step=step).accepted
    return accepted


def summarise_noise(probes: Sequence[Mapping[str, Any]], keep_fraction: float
                    ) -> dict[str, Any]:
    """Per mode and noise level: score quantiles, the paired change against the clean level
    (same batch, same state), and acceptance under the fixed threshold and under the dynamic one
    (all seeds pooled; the dynamic policy runs per seed and mode over a stream mixing all
    levels)."""
    out: dict[str, Any] = {}
    modes = sorted({r["mode"] for p in probes for r in p["rows"]})
    for mode in modes:
        per_level: dict[float, dict[str, list]] = {}
        for p in probes:
            rows = [r for r in p["rows"] if r["mode"] == mode and math.isfinite(r["score"])]
            clean = {r["batch"]: r["score"] for r in rows if float(r["level"]) == 0.0}
            scores = np.array([r["score"] for r in rows])
            dynamic = dynamic_acceptance(scores, keep_fraction, seed=p["seed"])
            for r, dyn in zip(rows, dynamic):
                entry = per_level.setdefault(float(r["level"]),
                                             {"scores": [], "dynamic": [], "paired": []})
                entry["scores"].append(float(r["score"]))
                entry["dynamic"].append(bool(dyn))
                if r["batch"] in clean:
                    entry["paired"].append(float(r["score"]) - clean[r["batch"]])
        out[mode] = {
            str(level): {
                "n": len(v["scores"]),
                "mean": float(np.mean(v["scores"])),
                "median": float(np.median(v["scores"])),
                "q10": float(np.quantile(v["scores"], 0.1)),
                "q90": float(np.quantile(v["scores"], 0.9)),
                "paired_change_mean": float(np.mean(v["paired"])) if v["paired"] else math.nan,
                "paired_lower_fraction": float(np.mean(np.array(v["paired"]) < 0))
                if v["paired"] else math.nan,
                "accept_fixed": float(np.mean(np.array(v["scores"]) >= FIXED_THRESHOLD)),
                "accept_dynamic": float(np.mean(v["dynamic"])),
                "scores": v["scores"],
            }
            for level, v in sorted(per_level.items())
        }
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def summarise_fidelity(probes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per mode and look-ahead step size: Spearman rank correlation of the score with the exact
    gain, sign agreement (score ≥ 0 ⇔ gain ≥ 0), agreement of the fixed-threshold decision
    (score ≥ −0.05) with gain ≥ 0; plus how the scores and gains rank against the batch's
    fraction of failed candidates. Seeds pooled (the per-seed numbers are kept too)."""
    alphas = probes[0]["alphas"] if probes else []
    rows = [r for p in probes for r in p["rows"]
            if all(math.isfinite(r[mode]) for mode in MODES)
            and all(math.isfinite(g) for g in r["gain"].values())]

    def block(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        bad = [-r["bad_fraction"] for r in rows]
        result: dict[str, Any] = {"n": len(rows)}
        for alpha in alphas:
            gain = [r["gain"][str(alpha)] for r in rows]
            per_mode = {}
            for mode in MODES:
                score = [r[mode] for r in rows]
                per_mode[mode] = {
                    "spearman": _spearman(score, gain),
                    "sign_agreement": float(np.mean([(s >= 0) == (g >= 0)
                                                     for s, g in zip(score, gain)]))
                    if rows else float("nan"),
                    "fixed_decision_agreement": float(np.mean(
                        [(s >= FIXED_THRESHOLD) == (g >= 0) for s, g in zip(score, gain)]))
                    if rows else float("nan"),
                }
            result[str(alpha)] = {**per_mode, "gain_positive": float(np.mean(
                [g >= 0 for g in gain])) if rows else float("nan"),
                "gain_vs_good_fraction": _spearman(gain, bad)}
        for mode in MODES:
            result[f"{mode}_vs_good_fraction"] = _spearman([r[mode] for r in rows], bad)
            result[f"{mode}_accept_fixed"] = float(np.mean(
                [r[mode] >= FIXED_THRESHOLD for r in rows])) if rows else float("nan")
        return result

    return {"alphas": alphas, "pooled": block(rows),
            "per_seed": {str(p["seed"]): block([r for r in p["rows"] if r in rows])
                         for p in probes}}

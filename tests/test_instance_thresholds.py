"""Instance-level thresholds (selector/instance_thresholds.py): the calibrated threshold's bound
on good candidates rejected, its drift handling, pooled fallback and checkpoint; percentile
windows that count steps; the fixed threshold at instance granularity; the config's choices;
and the trainer calibrating on real instances it never trains on."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks._candidate_stream import real_cutouts
from pipeline.config import ConfigError, load_config
from selector.instance_selector import InstanceSelector, QualityGates
from selector.instance_thresholds import (
    CalibratedThreshold,
    FixedInstanceThreshold,
    PerClassPercentileThreshold,
    conformal_lower_bound,
)
from selector.methods import resolved_threshold
from tests.conftest import CONFIGS
from trainer.datasets import LvisDataset
from trainer.factory import build_trainer
from trainer.step import CALIBRATION_POSITIONS

TRAIN_IMAGES = 64  # the conftest ``train_set`` fixture


def _stream(threshold: Any, *, steps: int, failure_rate: float, drift: float = 0.0,
            seed: int = 0) -> dict[str, float]:
    """A synthetic run: per step, 4 real reference scores and 8 candidates per class of 3
    classes whose good scores ~ N(mean_c - drift * step, 0.1) (the classes' scales differ);
    failures score 0.3 lower. Returns the shares of good and failed candidates rejected."""
    rng = np.random.default_rng(seed)
    means = {1: 0.6, 2: 0.4, 3: 0.1}
    rejected: Counter = Counter()
    seen: Counter = Counter()
    for step in range(steps):
        for cid, mean in means.items():
            centre = mean - drift * step
            if isinstance(threshold, CalibratedThreshold):
                threshold.observe(cid, rng.normal(centre, 0.1, 4).tolist(), step=step)
            failed = rng.random(8) < failure_rate
            scores = rng.normal(centre, 0.1, 8) - 0.3 * failed
            for d, bad in zip(threshold.decide_all(scores.tolist(), [cid] * 8, step=step),
                              failed):
                kind = "failed" if bad else "good"
                seen[kind] += 1
                rejected[kind] += not d.accepted
    return {k: rejected[k] / seen[k] for k in seen}


@pytest.mark.parametrize("failure_rate", [0.0, 0.4, 0.7])
def test_calibrated_rejects_about_alpha_of_good_whatever_the_failure_rate(
        failure_rate: float) -> None:
    got = _stream(CalibratedThreshold(0.1, window_steps=50, min_reference=10), steps=300,
                  failure_rate=failure_rate)
    assert abs(got["good"] - 0.1) <= 0.03, got
    if failure_rate:
        assert got["failed"] >= 0.85, got  # 3 standard deviations below: nearly all caught
    # the percentile cannot know: it rejects 30 % of good ones with a perfect generator
    percentile = _stream(PerClassPercentileThreshold(0.7, window_steps=50), steps=300,
                         failure_rate=failure_rate)
    if failure_rate == 0.0:
        assert percentile["good"] >= 0.25, percentile


def test_a_window_of_steps_follows_drifting_scores() -> None:
    drift = 0.002  # the good scores fall by 0.6 over the run
    windowed = _stream(CalibratedThreshold(0.1, window_steps=20, min_reference=10), steps=300,
                       failure_rate=0.4, drift=drift)
    assert abs(windowed["good"] - 0.1) <= 0.04, windowed
    # a window spanning the whole run keeps old, higher scores: far more good ones rejected
    stale = _stream(CalibratedThreshold(0.1, window_steps=10**6, min_reference=10), steps=300,
                    failure_rate=0.4, drift=drift)
    assert stale["good"] > 0.3, stale
    # the percentile over steps keeps what it says under the same drift, a long window does not
    keep = 1 - _stream(PerClassPercentileThreshold(0.7, window_steps=5), steps=300,
                       failure_rate=0.0, drift=drift)["good"]
    assert abs(keep - 0.7) <= 0.05, keep
    long = 1 - _stream(PerClassPercentileThreshold(0.7, window_steps=10**6), steps=300,
                       failure_rate=0.0, drift=drift)["good"]
    assert long < 0.6, long


def test_the_conformal_bound_and_the_pooled_fallback() -> None:
    ref = np.arange(1.0, 20.0)  # 19 scores: floor(0.1 * 20) = 2 -> the 2nd smallest
    assert conformal_lower_bound(ref, 0.1) == 2.0
    assert conformal_lower_bound(np.arange(8.0), 0.1) == -math.inf  # too few to reject
    t = CalibratedThreshold(0.1, window_steps=100, min_reference=10)
    d = t.decide_all([-5.0], [1], step=0)[0]
    assert d.accepted and d.threshold == -math.inf  # no evidence, no rejection
    t.observe(1, list(np.linspace(0.5, 0.9, 30)), step=0)  # class 1: its own reference
    t.observe(2, [0.0, 0.1], step=0)  # class 2: two real scores only -> the pool
    assert t.reference(1)[1] == "class" and t.reference(2)[1] == "pooled"
    pooled = np.concatenate([np.linspace(0.5, 0.9, 30), [0.0, 0.1]])
    assert t.threshold(2) == conformal_lower_bound(pooled, 0.1)
    assert t.threshold(1) == conformal_lower_bound(np.linspace(0.5, 0.9, 30), 0.1)
    assert t.threshold(7) == t.threshold(2)  # a class never seen: the pool
    summary = t.summary()
    assert summary[1]["own_reference"] == 1.0 and summary[2]["own_reference"] == 0.0
    assert summary[1]["reference_scores"] == 30
    t.observe(3, [math.nan, 0.5], step=0)  # a non-finite real score is left out
    assert t.classes.values(3).tolist() == [0.5]


def test_a_rare_class_keeps_its_last_real_scores_however_old() -> None:
    t = CalibratedThreshold(0.1, window_steps=10, min_reference=10)
    t.observe(5, list(np.linspace(0.0, 1.0, 12)), step=0)
    t.decide_all([0.5], [5], step=500)  # prunes: class 5 keeps its last 10, the pool none
    assert t.classes.values(5).size == 10 and t.pooled.values(-1).size == 0
    assert t.reference(5)[1] == "class"


def test_the_reference_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    a = CalibratedThreshold(0.1, window_steps=30, min_reference=10)
    _stream(a, steps=40, failure_rate=0.4, seed=1)
    torch.save(a.state_dict(), tmp_path / "t.pt")
    b = CalibratedThreshold(0.1, window_steps=30, min_reference=10)
    b.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    assert _stream(a, steps=20, failure_rate=0.4, seed=2) == \
        _stream(b, steps=20, failure_rate=0.4, seed=2)
    with pytest.raises(ValueError, match="not the per-class percentile"):
        PerClassPercentileThreshold(0.5, window_steps=3).load_state_dict(a.state_dict())


def test_the_fixed_threshold_works_per_instance() -> None:
    selector = InstanceSelector("composite", gates=QualityGates({"mask_score": 0.5}),
                                threshold=FixedInstanceThreshold(0.2), caches=object())
    got = selector.decide(step=3, class_ids=[1, 2, 1], fields=[{"mask_score": 0.9}] * 3,
                          scores=[0.5, 0.1, 0.2], cache_norms=[1.0, 1.0, 1.0])
    assert [d.reason for d in got] == ["accepted", "rejected_score", "accepted"]
    assert {d.threshold for d in got} == {0.2}


def test_the_config_names_each_threshold_where_it_applies() -> None:
    demo = CONFIGS / "demo.yaml"
    assert resolved_threshold("batch", "auto") == "fixed"
    assert resolved_threshold("instance", "auto") == "dynamic"
    assert resolved_threshold("instance", "auto", calibratable=False) == "dynamic"
    load_config(demo, ["selection.threshold=auto", "selection.method=gated_loss"])  # -> dynamic
    with pytest.raises(ConfigError, match="needs selection.granularity=instance"):
        load_config(demo, ["selection.granularity=batch", "selection.method=bsgal",
                           "selection.threshold=calibrated"])
    with pytest.raises(ConfigError, match="schedule ramps a batch-level"):
        load_config(demo, ["selection.threshold=schedule"])
    with pytest.raises(ConfigError, match="method 'gated_loss'.*threshold=dynamic"):
        load_config(demo, ["selection.method=gated_loss", "selection.threshold=calibrated"])
    for bad in ("0", "1", "1.5", "nan"):
        with pytest.raises(ConfigError, match="selection.alpha"):
            load_config(demo, [f"selection.alpha={bad}"])
    with pytest.raises(ConfigError, match="selection.threshold_window_steps"):
        load_config(demo, ["selection.threshold_window_steps=0"])


def _trainer(ds: LvisDataset, **selection: Any):
    return build_trainer(ds, training={"batch_size": 2, "lr": 5e-4, "warmup_steps": 2,
                                       "steps": 20, "device": "cpu", "max_pastes_per_image": 2},
                         selection={"granularity": "instance", "method": "composite",
                                    "quality_gates": {"mask_score": 0.3},
                                    "threshold": "calibrated", **selection}, seed=0)


def test_the_trainer_calibrates_on_real_instances_it_never_trains_on(
        train_set: LvisDataset, tmp_path: Path) -> None:
    trainer = _trainer(train_set, calibration_pastes=3, calibration_min_reference=2)
    seen: list[tuple[int, int]] = []
    original = trainer.step_fn.backward_stock

    def recording(images, targets, step, batch):
        seen.append((step, sum(int(t["generated"].sum()) for t in targets)))
        return original(images, targets, step, batch)

    trainer.step_fn.backward_stock = recording
    pieces: list[int] = []
    paste = trainer.paste_next

    def counting(pool, real_test=True):
        batch = paste(pool, real_test)
        pieces.append(len(batch.calibration))
        assert all(c.position >= CALIBRATION_POSITIONS for c in batch.calibration)
        assert {c.class_id for c in batch.calibration} <= set(batch.class_ids)
        return batch

    trainer.paste_next = counting
    rows = real_cutouts(train_set, 24, seed=3, mask_scores=True)
    result = trainer.train_on_candidates(rows)
    # one row per candidate, none for the real pieces
    assert [d["sample_id"] for d in result.decisions] == [r["sample_id"] for r in rows]
    reference = trainer.selector.threshold
    assert sum(pieces) > 0 and reference.pooled.values(-1).size > 0
    assert np.all(np.abs(reference.pooled.values(-1)) <= 1.0)  # cosines
    # each training pass holds exactly the candidates accepted at its step: no real piece
    accepted_per_step = Counter(d["step"] for d in result.decisions if d["accepted"])
    assert seen and [n for _, n in seen] == [accepted_per_step.get(s, 0) for s, _ in seen]
    scored = [d for d in result.decisions if d["reason"] in ("accepted", "rejected_score")]
    assert scored and all(d["threshold"] is not None for d in scored)

    # resume: the reference and the draws of real pieces continue bit for bit
    torch.save(trainer.state_dict(), tmp_path / "ckpt.pt")
    more = real_cutouts(train_set, 12, seed=5, mask_scores=True)
    rest_a = trainer.train_on_candidates(more).decisions
    b = _trainer(train_set, calibration_pastes=3, calibration_min_reference=2)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    rest_b = b.train_on_candidates(more).decisions
    assert [(d["reason"], d["score"], d["threshold"]) for d in rest_a] == \
        [(d["reason"], d["score"], d["threshold"]) for d in rest_b]

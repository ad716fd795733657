"""Judging stored candidates at a fixed detector state without training (trainer/rescore.py):
no weight moves, the same batch scores the same whichever order, two states judge apart, the
checkpoint's caches or fresh real gradients, and the thresholds applied in stream order."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch

from benchmarks._candidate_stream import real_cutouts
from trainer.datasets import LvisDataset
from trainer.factory import build_trainer
from trainer.rescore import PRE_REASON, SCORE, Rescorer, decide

TRAIN_IMAGES = 64


def _trainer(ds: LvisDataset, **selection: Any):
    return build_trainer(ds, training={"batch_size": 2, "lr": 5e-4, "warmup_steps": 2,
                                       "steps": 20, "device": "cpu", "max_pastes_per_image": 2},
                         selection={"granularity": "instance", "method": "composite",
                                    "threshold": "dynamic", "keep_fraction": 0.5,
                                    "quality_gates": {"mask_score": 0.4},
                                    **selection}, seed=0)


@pytest.fixture(scope="module")
def states(train_set: LvisDataset) -> dict[str, Any]:
    """Two trainer states of one run: after 8 candidates and after 8 + 24 more."""
    trainer = _trainer(train_set)
    trainer.train_on_candidates(real_cutouts(train_set, 8, seed=1, mask_scores=True))
    early = copy.deepcopy(trainer.state_dict())  # state_dict holds the live tensors
    trainer.train_on_candidates(real_cutouts(train_set, 24, seed=2, mask_scores=True))
    return {"early": early, "late": trainer.state_dict()}


def _restored(ds: LvisDataset, state: dict[str, Any]):
    trainer = _trainer(ds)
    trainer.load_state_dict(state)
    return trainer


def test_scoring_moves_no_weight_or_buffer_and_is_the_same_in_any_order(
        train_set: LvisDataset, states: dict[str, Any]) -> None:
    rows = real_cutouts(train_set, 12, seed=5, mask_scores=True)
    trainer = _restored(train_set, states["late"])
    before = {k: v.clone() for k, v in trainer.backend.module.state_dict().items()}
    rescorer = Rescorer(trainer, cache="real", real_images=4)
    first = rescorer.score(rows[:6], 0)
    rescorer.score(rows[6:], 6)
    after = trainer.backend.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.step == states["late"]["step"]
    # another rescorer meeting the batches in the other order scores batch 0 the same
    other = Rescorer(_restored(train_set, states["late"]), cache="real", real_images=4)
    other.score(rows[6:], 6)
    again = other.score(rows[:6], 0)
    assert [s[PRE_REASON] for s in again] == [s[PRE_REASON] for s in first]
    assert [s[SCORE] for s in again] == pytest.approx([s[SCORE] for s in first], nan_ok=True)
    scored = [s for s in first if not s[PRE_REASON] and s[SCORE] == s[SCORE]]
    assert scored and all(-1.0 <= s[SCORE] <= 1.0 for s in scored)


def test_two_checkpoints_judge_some_candidates_apart(train_set: LvisDataset,
                                                     states: dict[str, Any]) -> None:
    rows = real_cutouts(train_set, 24, seed=7, mask_scores=True)
    judged = {}
    for name, state in states.items():
        trainer = _restored(train_set, state)
        rescorer = Rescorer(trainer, cache="real", real_images=4)
        decisions = []
        for start in range(0, len(rows), 8):
            batch = rows[start:start + 8]
            decisions += decide(trainer.selector, batch, rescorer.score(batch, start),
                                step=trainer.step, first_offset=start, batch_id=name,
                                method=trainer.method)
        judged[name] = decisions
    for decisions in judged.values():
        assert [d["sample_id"] for d in decisions] == [r["sample_id"] for r in rows]
        assert [d["stream_offset"] for d in decisions] == list(range(len(rows)))
        reasons = Counter(d["reason"] for d in decisions)
        assert reasons["accepted"] > 0 and reasons["rejected_score"] > 0
        low = [d for d, r in zip(decisions, rows) if r["mask_score"] < 0.4]
        assert low and all(d["reason"] == "rejected_quality" for d in low)
    flips = [a["sample_id"] for a, b in zip(judged["early"], judged["late"])
             if a["accepted"] != b["accepted"]]
    assert flips
    scores = [(a["score"], b["score"]) for a, b in zip(judged["early"], judged["late"])
              if a["score"] == a["score"] and b["score"] == b["score"]]
    assert any(abs(a - b) > 1e-6 for a, b in scores)


def test_checkpoint_caches_are_used_as_saved_and_an_unseen_class_says_empty_cache(
        train_set: LvisDataset, states: dict[str, Any]) -> None:
    trainer = _restored(train_set, states["early"])
    cached = set(trainer.selector.caches.caches)
    assert cached
    saved = copy.deepcopy(trainer.selector.caches.state_dict())
    rows = real_cutouts(train_set, 16, seed=9, mask_scores=True)
    results = Rescorer(trainer, cache="checkpoint").score(rows, 0)
    assert _same(saved, trainer.selector.caches.state_dict())  # held fixed
    for row, s in zip(rows, results):
        if s[PRE_REASON] == "invalid_empty_cache":
            assert int(row["class_id"]) not in cached
        elif not s[PRE_REASON] and row["mask_score"] >= 0.4:
            assert int(row["class_id"]) in cached


def _same(a: Any, b: Any) -> bool:
    """Equal nested lists/dicts of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_batch_level_run_is_refused_with_the_setting_to_use(train_set: LvisDataset) -> None:
    trainer = build_trainer(train_set, training={"device": "cpu", "batch_size": 2},
                            selection={"granularity": "batch", "method": "bsgal"}, seed=0)
    with pytest.raises(ValueError, match="granularity=instance"):
        Rescorer(trainer)

"""Threshold policies and baselines: decision rules, reference semantics, checkpointable state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selector import (
    ACCEPTED,
    INVALID_MISSING_FIELD,
    INVALID_NAN_FIELD,
    INVALID_NAN_SCORE,
    REJECTED_SCORE,
    AcceptAll,
    Decision,
    DynamicPercentileThreshold,
    FieldThreshold,
    FixedThreshold,
    LinearKeepFraction,
    RandomAcceptance,
    RareClassMinAcceptRate,
)


def round_trip(state: dict, tmp_path) -> dict:
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


def test_decision_record_rejects_unknown_or_inconsistent_reasons():
    with pytest.raises(ValueError, match="unknown decision reason 'maybe'"):
        Decision(accepted=False, reason="maybe", step=0)
    with pytest.raises(ValueError, match="inconsistent"):
        Decision(accepted=True, reason=REJECTED_SCORE, step=0)
    with pytest.raises(ValueError, match="inconsistent"):
        Decision(accepted=True, reason="invalid_empty_batch", step=0)
    row = Decision(accepted=True, reason=ACCEPTED, step=3, score=0.2, threshold=-0.05,
                   policy="fixed_threshold").as_dict()
    assert row == {"accepted": True, "reason": "accepted", "step": 3, "score": 0.2,
                   "threshold": -0.05, "cache_norm": None, "policy": "fixed_threshold"}


def test_fixed_threshold_accepts_at_and_above_minus_0_05():
    policy = FixedThreshold()  # reference default
    assert policy.decide(-0.05, step=0).accepted
    assert policy.decide(0.3, step=1).reason == ACCEPTED
    rejected = policy.decide(-0.0501, step=2)
    assert (rejected.accepted, rejected.reason, rejected.threshold) == (False, REJECTED_SCORE,
                                                                       -0.05)
    assert policy.decide(float("nan"), step=3).reason == INVALID_NAN_SCORE


def test_fixed_threshold_per_class_uses_the_most_lenient_class():
    policy = FixedThreshold(0.0, class_thresholds={7: -0.5})
    assert not policy.decide(-0.2, step=0, class_ids=[1, 2]).accepted
    decision = policy.decide(-0.2, step=0, class_ids=[1, 7])
    assert decision.accepted and decision.threshold == -0.5


def test_dynamic_threshold_is_the_percentile_of_the_window_including_the_score():
    scores = [0.3, -0.2, 0.1, 0.5, -0.4, 0.05, 0.2]
    policy = DynamicPercentileThreshold(keep_fraction=0.3, window=4)
    for i, score in enumerate(scores):
        window = scores[max(0, i - 3):i + 1]
        expected = float(np.percentile(window, 70))
        decision = policy.decide(score, step=i)
        assert decision.threshold == pytest.approx(expected)
        assert decision.accepted == (score >= expected)
    assert list(policy.scores) == scores[-4:]
    # Hand check of the first steps (keep 0.3 → 70th percentile): [0.3] → 0.3 accepts 0.3;
    # [0.3, -0.2] → 0.15 rejects -0.2.
    fresh = DynamicPercentileThreshold(keep_fraction=0.3, window=4)
    assert fresh.decide(0.3, step=0).accepted
    assert fresh.decide(-0.2, step=1).threshold == pytest.approx(0.15)


def test_dynamic_threshold_keeps_the_fraction_from_the_first_steps():
    """A short run (the window never fills) whose scores are all positive still keeps about r:
    the reference's initial 0.0 threshold would accept them all until the window holds some."""
    generator = torch.Generator().manual_seed(1)
    scores = (torch.rand(60, generator=generator) * 0.5 + 0.1).tolist()
    policy = DynamicPercentileThreshold(keep_fraction=0.5, window=1000)
    rate = sum(policy.decide(s, step=i).accepted for i, s in enumerate(scores)) / len(scores)
    assert 0.4 <= rate <= 0.62, rate


@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_dynamic_threshold_keeps_about_the_requested_fraction(keep):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3000, generator=generator).tolist()
    policy = DynamicPercentileThreshold(keep_fraction=keep, window=1000)
    accepted = [policy.decide(s, step=i).accepted for i, s in enumerate(scores)]
    rate = sum(accepted[1000:]) / 2000
    assert abs(rate - keep) < 0.05, rate


def test_invalid_scores_do_not_enter_the_window():
    policy = DynamicPercentileThreshold(0.5, window=10)
    policy.decide(0.1, step=0)
    assert policy.decide(float("inf"), step=1).reason == INVALID_NAN_SCORE
    assert list(policy.scores) == [0.1]


def test_linear_keep_fraction_schedule():
    schedule = LinearKeepFraction(0.3, 0.5, total_steps=100)
    assert schedule(0) == pytest.approx(0.3)
    assert schedule(50) == pytest.approx(0.4)
    assert schedule(100) == pytest.approx(0.5)
    assert schedule(500) == pytest.approx(0.5)
    policy = DynamicPercentileThreshold(schedule, window=100)
    for i, s in enumerate(np.linspace(-1, 1, 11)):
        policy.decide(float(s), step=i)
    window = list(policy.scores)
    assert policy.threshold(0) == pytest.approx(float(np.percentile(window, 70)))
    assert policy.threshold(100) == pytest.approx(float(np.percentile(window, 50)))
    with pytest.raises(ValueError, match="start=0.0"):
        LinearKeepFraction(0.0, 0.5, 10)


def test_dynamic_state_round_trip(tmp_path):
    policy = DynamicPercentileThreshold(0.5, window=5)
    for i, s in enumerate([0.4, -0.1, 0.2, 0.3, -0.3, 0.1]):
        policy.decide(s, step=i)
    restored = DynamicPercentileThreshold(0.5, window=5)
    restored.load_state_dict(round_trip(policy.state_dict(), tmp_path))
    assert list(restored.scores) == list(policy.scores)
    for i, s in enumerate([0.15, -0.2, 0.35]):
        assert restored.decide(s, step=10 + i) == policy.decide(s, step=10 + i)
    with pytest.raises(ValueError, match="window=7"):
        DynamicPercentileThreshold(0.5, window=7).load_state_dict(policy.state_dict())


def test_rare_class_floor_keeps_the_acceptance_rate_at_or_above_the_minimum(tmp_path):
    policy = RareClassMinAcceptRate(FixedThreshold(0.5), class_ids=[7], min_accept_rate=0.25)
    decisions = [policy.decide(0.0, step=i, class_ids=[3, 7]) for i in range(20)]
    accepted = [d.accepted for d in decisions]
    # The base rejects everything; the floor accepts the 1st, then whenever rejecting would
    # drop the rate below 0.25: after 0/1 → accept, then rates 1/2 1/3 1/4 fine, 1/5 → accept...
    assert accepted[:6] == [True, False, False, False, True, False]
    for n in range(1, 21):
        assert sum(accepted[:n]) / n >= 0.25
    assert sum(accepted) == 5
    assert all(d.policy == "rare_class_min_accept_rate" for d in decisions if d.accepted)
    assert policy.acceptance_rate(7) == 0.25
    assert not any(policy.decide(0.0, step=30 + i, class_ids=[3]).accepted for i in range(5))

    restored = RareClassMinAcceptRate(FixedThreshold(0.5), class_ids=[7], min_accept_rate=0.25)
    restored.load_state_dict(round_trip(policy.state_dict(), tmp_path))
    for i in range(8):
        assert restored.decide(0.0, step=40 + i, class_ids=[7]) == \
            policy.decide(0.0, step=40 + i, class_ids=[7])


def test_accept_all():
    decision = AcceptAll().decide(None, step=4)
    assert decision.accepted and decision.policy == "accept_all" and decision.score is None


def test_random_acceptance_rate_and_reproducible_resume(tmp_path):
    policy = RandomAcceptance(0.3, seed=11)
    accepted = [policy.decide(None, step=i).accepted for i in range(2000)]
    assert abs(sum(accepted) / 2000 - 0.3) < 0.04
    state = round_trip(policy.state_dict(), tmp_path)
    upcoming = [policy.decide(None, step=i).accepted for i in range(50)]
    restored = RandomAcceptance(0.3, seed=999)  # different seed: the state must win
    restored.load_state_dict(state)
    assert [restored.decide(None, step=i).accepted for i in range(50)] == upcoming
    assert not any(RandomAcceptance(0.0).decide(None, step=i).accepted for i in range(50))


def test_field_threshold():
    policy = FieldThreshold("clip_score", 0.21)
    decision = policy.decide(None, step=0, fields={"clip_score": [0.3, 0.2]})
    assert decision.accepted and decision.score == pytest.approx(0.25)
    assert policy.decide(None, step=0, fields={"clip_score": 0.1}).reason == REJECTED_SCORE
    strict = FieldThreshold("clip_score", 0.21, reduce="min")
    assert not strict.decide(None, step=0, fields={"clip_score": [0.3, 0.2]}).accepted
    assert policy.decide(None, step=0, fields={"mask_score": 1.0}).reason == INVALID_MISSING_FIELD
    assert policy.decide(None, step=0, fields=None).reason == INVALID_MISSING_FIELD
    assert policy.decide(None, step=0, fields={"clip_score": []}).reason == INVALID_MISSING_FIELD
    nan = policy.decide(None, step=0, fields={"clip_score": [0.3, float("nan")]})
    assert nan.reason == INVALID_NAN_FIELD and not nan.accepted

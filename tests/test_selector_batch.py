"""Contribution score, the BatchSelector façade (invalid input, one decision per batch), the
factory and whole-selector checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selector import (
    INVALID_EMPTY_BATCH,
    INVALID_EMPTY_CACHE,
    INVALID_NAN_CANDIDATE_GRAD,
    INVALID_NAN_REAL_GRAD,
    INVALID_NAN_SCORE,
    AcceptAll,
    BatchSelector,
    DynamicPercentileThreshold,
    FieldThreshold,
    FixedThreshold,
    FlatGradient,
    GradientCache,
    RandomAcceptance,
    RareClassMinAcceptRate,
    build_selection_policy,
    build_selector,
    contribution_score,
    parameter_gradients,
)
from tests.conftest import make_params


def cache_holding(vector: list[float]) -> GradientCache:
    cache = GradientCache(make_params(), mode="average")
    cache.update(torch.tensor(vector))  # first average update: cache = vector exactly
    return cache


def test_cosine_and_dot_against_hand_values():
    cache = cache_holding([1.0, 0.0, 0.0, 0.0])
    candidate = torch.tensor([1.0, 1.0, 0.0, 0.0])
    cos = contribution_score(cache, candidate, "cosine")
    assert cos.value == pytest.approx(1 / math.sqrt(2))
    assert cos.dot == pytest.approx(1.0) and cos.candidate_norm == pytest.approx(math.sqrt(2))
    assert contribution_score(cache, candidate, "dot").value == pytest.approx(1.0)
    opposite = contribution_score(cache, -candidate, "cosine")
    assert opposite.value == pytest.approx(-1 / math.sqrt(2))
    per_param = [torch.tensor([2.0, 0.0]), None]
    assert contribution_score(cache, per_param, "cosine").value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'angle'"):
        contribution_score(cache, candidate, "angle")


def test_zero_gradients_score_zero_without_dividing_by_zero():
    cache = cache_holding([1.0, 2.0, 0.0, 0.0])
    zero = contribution_score(cache, torch.zeros(4), "cosine")
    assert zero.value == 0.0 and zero.finite
    assert contribution_score(cache, [None, None], "cosine").value == 0.0
    zero_cache = cache_holding([0.0, 0.0, 0.0, 0.0])
    assert contribution_score(zero_cache, torch.ones(4), "cosine").value == 0.0
    selector = BatchSelector(FixedThreshold(), cache=zero_cache)
    decision = selector.decide(step=0, num_generated=3, candidate_grad=torch.zeros(4))
    assert decision.score == 0.0 and decision.accepted and decision.cache_norm == 0.0


def test_nan_candidate_is_invalid_and_leaves_cache_and_window_untouched():
    cache = cache_holding([1.0, 2.0, 3.0, 4.0])
    policy = DynamicPercentileThreshold(0.5, window=10)
    selector = BatchSelector(policy, cache=cache)
    selector.decide(step=0, num_generated=2, candidate_grad=torch.ones(4))
    buffer, updates, window = cache.buffer.clone(), cache.num_updates, list(policy.scores)
    for bad in (float("nan"), float("inf")):
        decision = selector.decide(step=1, num_generated=2,
                                   candidate_grad=torch.tensor([1.0, bad, 0.0, 0.0]))
        assert decision.reason == INVALID_NAN_CANDIDATE_GRAD
        assert not decision.accepted and decision.score is None
        assert decision.cache_norm == pytest.approx(math.sqrt(30))
    assert torch.equal(cache.buffer, buffer) and cache.num_updates == updates
    assert list(policy.scores) == window


def test_nan_real_gradient_makes_that_step_invalid_only():
    selector = BatchSelector(FixedThreshold(), cache=GradientCache(make_params()))
    assert selector.update_cache(torch.tensor([1.0, 0.0, 0.0, 0.0]), step=0) is None
    buffer = selector.cache.buffer.clone()
    decision = selector.select(step=1, num_generated=4,
                               real_grad=torch.tensor([float("nan"), 0.0, 0.0, 0.0]),
                               candidate_grad=torch.ones(4))
    assert decision.reason == INVALID_NAN_REAL_GRAD and not decision.accepted
    assert torch.equal(selector.cache.buffer, buffer)
    next_step = selector.select(step=2, num_generated=4, real_grad=torch.ones(4),
                                candidate_grad=torch.ones(4))
    # The NaN step left no trace: c = 0.1·(0.9·e1) + 0.9·ones.
    expected_cache = torch.tensor([0.99, 0.9, 0.9, 0.9])
    torch.testing.assert_close(selector.cache.buffer, expected_cache)
    expected_cos = float(expected_cache.sum() / (expected_cache.norm() * 2.0))
    assert next_step.accepted and next_step.score == pytest.approx(expected_cos)


def test_empty_batch_and_empty_cache_are_invalid_not_accepted():
    selector = BatchSelector(FixedThreshold(), cache=GradientCache(make_params()))
    # The reference would score an empty batch 0 ≥ −0.05 and accept it.
    empty = selector.decide(step=0, num_generated=0, candidate_grad=torch.zeros(4))
    assert empty.reason == INVALID_EMPTY_BATCH and not empty.accepted
    no_cache = selector.decide(step=0, num_generated=3, candidate_grad=torch.ones(4))
    assert no_cache.reason == INVALID_EMPTY_CACHE and not no_cache.accepted
    with pytest.raises(ValueError, match="needs candidate_grad"):
        selector.cache.update(torch.ones(4))
        selector.decide(step=1, num_generated=3)


def test_methods_without_cache_take_a_score_or_nothing():
    lookahead = BatchSelector(FixedThreshold(0.0, name="lookahead"), method="lookahead")
    assert not lookahead.needs_gradients
    assert lookahead.decide(step=0, num_generated=1, score=0.01).accepted
    assert not lookahead.decide(step=0, num_generated=1, score=-0.01).accepted
    assert lookahead.decide(step=0, num_generated=1, score=math.nan).reason == INVALID_NAN_SCORE
    with pytest.raises(ValueError, match="no gradient cache"):
        lookahead.decide(step=0, num_generated=1, candidate_grad=torch.ones(4))
    with pytest.raises(ValueError, match="no gradient cache"):
        lookahead.update_cache(torch.ones(4), step=0)
    field = BatchSelector(FieldThreshold("mask_score", 0.5), method="field_threshold")
    assert field.decide(step=0, num_generated=2, fields={"mask_score": [0.9, 0.7]}).accepted


def test_whole_selector_state_round_trip(tmp_path):
    def make() -> BatchSelector:
        policy = RareClassMinAcceptRate(DynamicPercentileThreshold(0.5, window=8), [5], 0.5)
        return BatchSelector(policy, cache=GradientCache(make_params(), momentum=0.1))

    generator = torch.Generator().manual_seed(0)
    stream = [(torch.randn(4, generator=generator), torch.randn(4, generator=generator),
               [int(torch.randint(0, 8, (), generator=generator))]) for _ in range(30)]
    original = make()
    for step, (real, candidate, classes) in enumerate(stream[:15]):
        original.select(step=step, num_generated=1, real_grad=real, candidate_grad=candidate,
                        class_ids=classes)
    torch.save(original.state_dict(), tmp_path / "selector.pt")
    restored = make()
    restored.load_state_dict(torch.load(tmp_path / "selector.pt", weights_only=True))
    for step, (real, candidate, classes) in enumerate(stream[15:], start=15):
        kwargs = dict(step=step, num_generated=1, real_grad=real, candidate_grad=candidate,
                      class_ids=classes)
        assert restored.select(**kwargs) == original.select(**kwargs)
    wrong = BatchSelector(AcceptAll(), method="accept_all")
    with pytest.raises(ValueError, match="method='bsgal'"):
        wrong.load_state_dict(original.state_dict())


def test_build_selector_maps_config_names_to_objects():
    params = make_params()
    bsgal = build_selector(params, method="bsgal", score="dot", cache_update="average",
                           cache_dtype="bfloat16", threshold="dynamic", keep_fraction=0.3,
                           window=50)
    assert bsgal.needs_gradients and bsgal.score_kind == "dot"
    assert bsgal.cache.mode == "average" and bsgal.cache.dtype == torch.bfloat16
    assert isinstance(bsgal.policy, DynamicPercentileThreshold) and bsgal.policy.window == 50
    fixed = build_selector(params)  # defaults = the reference: momentum 0.1, cosine, −0.05
    assert fixed.cache.momentum == 0.1 and fixed.score_kind == "cosine"
    assert isinstance(fixed.policy, FixedThreshold) and fixed.policy.threshold == -0.05
    schedule = build_selection_policy(threshold="schedule", keep_fraction_start=0.3,
                                      keep_fraction_end=0.5, total_steps=1000)
    assert schedule.keep_fraction_at(500) == pytest.approx(0.4)
    assert isinstance(build_selection_policy(method="random", random_p=0.2), RandomAcceptance)
    assert isinstance(build_selection_policy(method="accept_all"), AcceptAll)
    look = build_selector(params, method="lookahead")
    assert not look.needs_gradients and look.policy.name == "lookahead"
    rare = build_selection_policy(method="accept_all", rare_class_ids=[1],
                                  rare_min_accept_rate=0.1)
    assert isinstance(rare, RareClassMinAcceptRate)
    assert isinstance(build_selection_policy(rare_min_accept_rate=0.0), FixedThreshold)
    per_class = build_selection_policy(fixed_threshold=0.1, class_thresholds={3: -0.2})
    assert per_class.threshold_for([1, 3]) == -0.2 and per_class.threshold_for([1]) == 0.1
    assert build_selector(params, method="none") is None


def test_only_the_lookahead_method_takes_the_lookahead_path():
    params = make_params()
    assert build_selector(params, method="lookahead").uses_lookahead
    # Also behind a per-class floor, whose policy has another name.
    floored = build_selector(params, method="lookahead", rare_class_ids=[1],
                             rare_min_accept_rate=0.1)
    assert floored.uses_lookahead and floored.policy.name == "rare_class_min_accept_rate"
    for method in ("bsgal", "accept_all", "random"):
        assert not build_selector(params, method=method).uses_lookahead


@pytest.mark.parametrize("settings, message", [
    (dict(method="greedy"), "'greedy'"),
    (dict(threshold="median"), "'median'"),
    (dict(threshold="schedule", keep_fraction_start=0.3), "keep_fraction_end, total_steps"),
    (dict(threshold="dynamic", keep_fraction=1.5), "keep_fraction=1.5"),
    (dict(threshold="dynamic", window=0), "window=0"),
    (dict(method="field_threshold", field="clip_score"), "field_threshold"),
    (dict(method="random", random_p=2.0), "p=2.0"),
    (dict(rare_min_accept_rate=0.2), "rare_class_ids is empty"),
    (dict(score="angle"), "'angle'"),
    (dict(cache_sync="ring"), "'ring'"),
])
def test_build_selector_names_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        build_selector(make_params(), **settings)


def test_one_graph_two_losses_flat_and_per_parameter_paths_agree():
    """One graph, two losses (real part, generated part): the flat buffer and the per-parameter
    lists give the same decisions, and the graph still trains afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    flat_path = build_selector(params, threshold="dynamic", keep_fraction=0.5, window=20)
    list_path = build_selector(params, threshold="dynamic", keep_fraction=0.5, window=20)
    flat = FlatGradient(params)
    for step in range(12):
        x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
        generated = torch.arange(10) >= 6  # the last 4 rows stand for pasted instances
        per_row = F.cross_entropy(model(x), y, reduction="none")
        real_part, generated_part = per_row[~generated].mean(), per_row[generated].mean()

        flat_path.update_cache(flat.compute(real_part, retain_graph=True), step=step)
        by_flat = flat_path.decide(step=step, num_generated=4,
                                   candidate_grad=flat.compute(generated_part, retain_graph=True))
        list_path.update_cache(parameter_gradients(real_part, params, retain_graph=True),
                               step=step)
        by_list = list_path.decide(step=step, num_generated=4, candidate_grad=parameter_gradients(
            generated_part, params, retain_graph=True))
        assert by_flat.accepted == by_list.accepted
        assert by_flat.score == pytest.approx(by_list.score, abs=1e-6)

        optimizer.zero_grad()
        (per_row.mean() if by_flat.accepted else real_part).backward()
        optimizer.step()
    assert flat_path.cache.num_updates == 12


def test_one_flat_buffer_passed_twice_to_select_is_an_error_not_a_silent_accept():
    """``select(real_grad=flat.compute(a), candidate_grad=flat.compute(b))`` with one
    FlatGradient hands the same buffer twice: the cache would be fed the candidate's own
    gradient and every batch accepted. It is refused, and the documented order works."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.parameters())
    selector = build_selector(params, threshold="fixed", fixed_threshold=0.0)
    flat = FlatGradient(params)
    x = torch.randn(6, 4)
    real_loss = model(x[:3]).pow(2).sum()
    candidate_loss = -model(x[3:]).pow(2).sum()  # the opposite direction of the real loss
    with pytest.raises(ValueError, match="same memory"):
        selector.select(step=0, num_generated=1,
                        real_grad=flat.compute(real_loss, retain_graph=True),
                        candidate_grad=flat.compute(candidate_loss, retain_graph=True))
    assert selector.cache.num_updates == 0  # nothing was folded in
    per_param = parameter_gradients(model(x[:1]).sum(), params)
    with pytest.raises(ValueError, match="same memory"):
        selector.select(step=0, num_generated=1, real_grad=per_param, candidate_grad=per_param)
    selector.update_cache(flat.compute(real_loss, retain_graph=True), step=0)
    decision = selector.decide(step=0, num_generated=1,
                               candidate_grad=flat.compute(candidate_loss))
    assert decision.score < 0 and decision.reason == "rejected_score"
    two = FlatGradient(params)
    decision = selector.select(step=1, num_generated=1,
                               real_grad=two.compute(model(x[:3]).pow(2).sum()),
                               candidate_grad=flat.compute(-model(x[3:]).pow(2).sum()))
    assert not decision.accepted

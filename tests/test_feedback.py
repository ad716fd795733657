"""Closed-loop allocation without Ray: the demand state, the policies, the template bandit, the
prompt sampler's option weights, the generator's per-class/per-prompt failures, the config, and
what inspection reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from generators import PromptSampler
from generators.allocation import DemandState, FeedbackSettings, allocate
from generators.procedural import ProceduralGenerator
from pipeline.config import ConfigError, config_from_dict
from pipeline.run.steering import DemandBoard

IDS = [1, 2, 3, 4]
FREQ = ["r", "r", "c", "f"]
BASE = np.array([4.0, 4.0, 2.0, 1.0])


def _state(accept: dict[int, float], n: int = 100, options: int = 1) -> DemandState:
    state = DemandState(IDS, options, half_life=200)
    for cid, rate in accept.items():
        k = int(round(rate * n))
        state.record([cid] * n, [0] * n, [True] * k + [False] * (n - k))
    return state


def test_open_loop_keeps_the_weights_whatever_is_accepted() -> None:
    state = _state({1: 0.05, 2: 0.9, 3: 0.5, 4: 0.5})
    a = allocate(state, BASE, FREQ, [1] * 4, FeedbackSettings())
    assert np.array_equal(a.weights, BASE) and not FeedbackSettings().closed


def test_yield_aware_moves_generation_away_from_a_class_that_keeps_failing_but_not_to_zero(
        ) -> None:
    settings = FeedbackSettings(policy="yield_aware", floor=0.2)
    state = _state({1: 0.05, 2: 0.9, 3: 0.9, 4: 0.9}, n=400)
    a = allocate(state, BASE, FREQ, [1] * 4, settings)
    share = a.weights / a.weights.sum()
    open_share = BASE / BASE.sum()
    assert share[0] < 0.5 * open_share[0]  # class 1 is rejected 95 % of the time
    assert a.weights[0] >= settings.floor * BASE[0] - 1e-12  # never starved
    assert share[1] > open_share[1]
    # It can recover: once class 1's candidates are accepted, its weight comes back up.
    for _ in range(10):
        state.record([1] * 100, [0] * 100, [True] * 90 + [False] * 10)
    b = allocate(state, BASE, FREQ, [1] * 4, settings)
    assert b.weights[0] > 0.8 * BASE[0]


def test_deficit_draws_in_proportion_to_the_distance_from_the_target_and_stops_at_it() -> None:
    targets = {"r": 100, "c": 60, "f": 30}
    settings = FeedbackSettings(policy="deficit", targets=targets, stop_at_target=True)
    state = DemandState(IDS, 1)
    state.record([1] * 100, [0] * 100, [True] * 100)  # class 1 reached its target
    state.record([2] * 50, [0] * 50, [True] * 50)  # class 2 half way
    a = allocate(state, BASE, FREQ, [1] * 4, settings)
    assert a.weights[0] == 0 and a.stopped == (1,)
    assert a.weights[1] == pytest.approx(BASE[1] * 0.5)
    assert a.weights[2] == pytest.approx(BASE[2]) and a.weights[3] == pytest.approx(BASE[3])
    # Every class done: open loop again (generation never has nothing to draw).
    for cid, n in ((2, 50), (3, 60), (4, 30)):
        state.record([cid] * n, [0] * n, [True] * n)
    done = allocate(state, BASE, FREQ, [1] * 4, settings)
    assert np.allclose(done.weights / done.weights.sum(), BASE / BASE.sum())
    assert done.stopped == ()


def test_the_bandit_prefers_the_prompt_that_is_accepted_and_keeps_exploring() -> None:
    settings = FeedbackSettings(template_policy="bandit", exploration=0.1)
    state = DemandState(IDS, 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        options = rng.integers(0, 3, size=40)
        accepted = rng.random(40) < np.where(options == 1, 0.9, 0.2)
        classes = rng.choice([2, 3, 4], size=40)  # class 1 never generated: it borrows
        state.record(classes, options, accepted)
    a = allocate(state, BASE, FREQ, [3, 3, 3, 2], settings)
    assert np.allclose(a.option_probs[:3].sum(1), 1) and np.allclose(a.option_probs[3].sum(), 1)
    assert (a.option_probs[:, 1] > 0.6).all()  # the good option, class 1 included
    assert (a.option_probs[:3] >= 0.1 / 3 - 1e-12).all()  # exploration floor
    assert a.option_probs[3, 2] == 0  # class 4 has only two options
    uniform = allocate(state, BASE, FREQ, [3, 3, 3, 2], FeedbackSettings())
    assert np.allclose(uniform.option_probs[0], 1 / 3)


def test_state_round_trips_and_refuses_a_state_of_another_vocabulary() -> None:
    state = _state({1: 0.3, 2: 0.6}, options=2)
    again = DemandState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again.decisions == state.decisions == 200
    assert np.array_equal(again.option_decided, state.option_decided)
    bad = state.to_dict()
    bad["accepted"] = bad["accepted"][:2]
    with pytest.raises(ValueError, match="accepted"):
        DemandState.from_dict(bad)
    with pytest.raises(ValueError, match="one of each"):
        state.record([1, 2], [0], [True, False])


def test_demand_board_reports_shares_and_continues_a_snapshot() -> None:
    settings = FeedbackSettings(policy="yield_aware")
    board = DemandBoard(settings, BASE, IDS, ["a", "b", "c", "d"], FREQ, [2, 2, 2, 2])
    board.record([1] * 50 + [2] * 50, [0] * 100, [False] * 50 + [True] * 50, step=7)
    report = board.report()
    assert report["allocation_step"] == 7 and report["classes"]["a"]["decided"] == 50
    assert report["classes"]["a"]["share"] < report["classes"]["b"]["share"]
    snap = json.loads(json.dumps(board.snapshot()))
    again = DemandBoard(settings, BASE, IDS, ["a", "b", "c", "d"], FREQ, [2, 2, 2, 2],
                        state=snap["state"], step=snap["step"])
    for key in ("weights", "option_probs", "stopped", "version", "step"):
        assert again.allocation()[key] == board.allocation()[key]
    with pytest.raises(ValueError, match="vocabulary"):
        DemandBoard(settings, BASE[:3], IDS[:3], ["a", "b", "c"], FREQ[:3], [2, 2, 2],
                    state=snap["state"])


def test_sampler_draws_prompt_options_with_the_given_probabilities() -> None:
    sampler = PromptSampler.builtin(4, templates=["a {name}", "a photo of a {name}"])
    first = sampler.sample_batch(400)
    assert set(first["prompt_option"]) == {0, 1}
    sampler.set_option_weights(np.array([[0.0, 1.0]] * 4))
    steered = sampler.sample_batch(400)
    assert (steered["prompt_option"] == 1).all()
    assert all(p.startswith("a photo of") for p in steered["prompt"])
    # Same positions, same uniforms: the class and seed do not move with the option weights.
    assert np.array_equal(first["class_id"], steered["class_id"])
    assert np.array_equal(first["seed"], steered["seed"])
    with pytest.raises(ValueError, match="shape"):
        sampler.set_option_weights(np.ones((3, 2)))
    sampler.set_option_weights(None)
    assert np.array_equal(sampler.sample_batch(400)["prompt_option"], first["prompt_option"])


def test_generator_fails_by_class_and_by_prompt_option() -> None:
    gen = ProceduralGenerator(num_classes=4, image_size=32,
                              failure_by_class={1: 0.7}, failure_by_option=[1.0, 0.2])
    n = 300
    batch = {"class_id": np.array([1] * n + [2] * n), "seed": np.arange(2 * n),
             "prompt_option": np.array([0] * (2 * n))}
    fail = gen(batch)["truth_failure"] != "none"
    assert 0.6 < fail[:n].mean() < 0.8 and 0.3 < fail[n:].mean() < 0.5  # 0.7 vs default 0.4
    batch["prompt_option"] = np.array([1] * (2 * n))
    fail = gen(batch)["truth_failure"] != "none"
    assert fail[:n].mean() < 0.25
    with pytest.raises(ValueError, match="failure_by_class"):
        ProceduralGenerator(num_classes=4, failure_by_class={1: 1.5})


def test_config_checks_the_feedback_section() -> None:
    cfg = config_from_dict({"feedback": {"policy": "deficit", "template_policy": "bandit"},
                            "generation": {"prompt_template": ["a {name}", "b {name}"]}})
    assert cfg.feedback.policy == "deficit"
    with pytest.raises(ConfigError, match="feedback.floor"):
        config_from_dict({"feedback": {"floor": 0}})
    with pytest.raises(ConfigError, match="feedback.targets"):
        config_from_dict({"feedback": {"targets": {"x": 3}}})
    with pytest.raises(ConfigError, match="feedback.policy"):
        config_from_dict({"feedback": {"policy": "greedy"}})
    with pytest.raises(ConfigError, match="pool"):
        config_from_dict({"feedback": {"policy": "yield_aware"},
                          "generation": {"backend": "pool", "pool": "/x/pool.json"}})
    with pytest.raises(ConfigError, match="prompt_template"):
        config_from_dict({"generation": {"prompt_template": []}})


def test_inspection_reads_options_lag_and_the_allocation_history(tmp_path) -> None:
    from pipeline.inspection.feedback import feedback_line, feedback_summary, option_acceptance
    from pipeline.inspection.query import DecisionQuery
    from pipeline.inspection.report import build_report
    from pipeline.inspection.report_charts import allocation_svg
    from pipeline.storage.run_dir import MetricsLog, RunDir
    from tests.conftest import make_rows, write_run

    rows = make_rows()
    for i, r in enumerate(rows):
        r["prompt_option"] = i % 2
        r["allocation_step"] = -1 if i < 4 else max(0, r["step"] - 3)
        r["stream_position"] = i
    out = str(tmp_path / "run")
    write_run(out, rows)
    log = MetricsLog(RunDir(out))
    for step, share in ((2, 0.2), (4, 0.6)):
        log.log("allocation", step=step, rank=0, classes={
            "<b>evil</b>": {"share": share}, "plain": {"share": 1 - share}}, stopped=[])
    log.close()
    with DecisionQuery(out) as q:
        table = option_acceptance(q)
        fb = feedback_summary(q, closed_loop=True)
        page, meta = build_report(q)
    by_option = {r["option"]: r for r in table.rows}
    for option in (0, 1):
        mine = [r for i, r in enumerate(rows) if i % 2 == option]
        assert by_option[option]["total"] == len(mine)
        assert by_option[option]["accepted"] == sum(r["accepted"] for r in mine)
    lags = sorted(r["step"] - r["allocation_step"] for r in rows[4:])
    assert fb["lag_steps"]["rows"] == len(rows) - 4 and fb["lag_steps"]["max"] == lags[-1]
    assert fb["open_loop_rows"] == 4
    assert feedback_line(fb).startswith(f"closed loop: engaged after 4 of {len(rows)} "
                                        "candidates; decisions reached generation within")
    assert meta["allocation_records"] == 2 and 'id="allocation-chart"' in page
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "Open loop" in allocation_svg([])


def test_generation_may_run_only_so_far_ahead_of_the_decisions() -> None:
    board = DemandBoard(FeedbackSettings(policy="yield_aware"), BASE, IDS, ["a", "b", "c", "d"],
                        FREQ, [1, 1, 1, 1])
    assert board.allocation(8, max_ahead=12)["granted"]
    refused = board.allocation(8, max_ahead=12)
    assert not refused["granted"] and refused["ahead"] == 8
    board.record([1] * 8, [0] * 8, [True] * 8, step=3)  # the trainer decided them
    assert board.allocation(8, max_ahead=12)["granted"]
    assert board.report()["ahead"] == 8
    # A batch larger than the bound is still granted when nothing is ahead (no deadlock).
    board.record([2] * 8, [0] * 8, [True] * 8, step=4)
    assert board.allocation(20, max_ahead=12)["granted"]


def test_a_closed_loop_that_never_engaged_says_so_and_why(tmp_path) -> None:
    from pipeline.inspection.feedback import feedback_line, feedback_summary
    from pipeline.inspection.query import DecisionQuery
    from tests.conftest import make_rows, write_run

    rows = make_rows()
    for i, r in enumerate(rows):
        r["prompt_option"] = 0
        r["allocation_step"] = -1  # every candidate drawn before any decision came back
        r["stream_position"] = i
    out = str(tmp_path / "run")
    write_run(out, rows)
    with DecisionQuery(out) as q:
        fb = feedback_summary(q, closed_loop=True)
        # The same rows of an open-loop run (the demo's default) say nothing of a loop.
        assert feedback_summary(q, closed_loop=False) is None
    assert fb["engaged"] is False and fb["open_loop_rows"] == len(rows)
    line = feedback_line(fb)
    assert line.startswith(f"closed loop: never engaged: all {len(rows)} candidates")
    assert "feedback.max_ahead" in line and "generation.batch_size" in line

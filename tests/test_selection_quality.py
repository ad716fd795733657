"""Building blocks of benchmarks/selection_quality.py: streams, truth accounting, runs, probes,
aggregation. The benchmark itself is run by hand (it takes up to an hour)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks._candidate_stream import (
    acceptance_against_truth,
    add_object_noise,
    batches,
    good_only,
    load_stream,
    make_candidate_stream,
    save_stream,
    take,
)
from benchmarks._method_runs import (
    MethodSpec,
    RunJob,
    Sizes,
    build_finetune_trainer,
    finetune,
    method_specs,
    run_candidate_steps,
)
from benchmarks._quality_report import (
    aggregate_methods,
    kinds_markdown,
    mean_std,
    methods_markdown,
    noise_markdown,
    plot_noise,
)
from benchmarks._score_probes import (
    BSGAL_FIXED,
    _candidates,
    _score_once,
    dynamic_acceptance,
    summarise_fidelity,
    summarise_noise,
)

SIZES = Sizes(train_images=240, val_images=60, pretrain_steps=0, finetune_steps=3,
              candidates=64, candidate_batch=8, batch_size=2, max_pastes_per_image=2, lr=5e-4,
              finetune_lr=5e-4, probe_batches=1, fidelity_batches=1, noise_levels=(0.0, 0.8))


@pytest.fixture(scope="module")
def stream(builtin_data: Path) -> dict[str, np.ndarray]:
    return make_candidate_stream(builtin_data / "train.json", 64, seed=3, run_id="test")


@pytest.fixture(scope="module")
def checkpoint(builtin_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random-init weights of the small detector saved like the benchmark's pretraining."""
    from trainer.datasets import LvisDataset
    from trainer.factory import build_detector

    torch.manual_seed(0)
    detector = build_detector(LvisDataset(builtin_data, "train.json").num_classes,
                              device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "pretrained.pt"
    torch.save({"model": detector.module.state_dict()}, path)
    return str(path)


def test_stream_is_deterministic_and_carries_truth(builtin_data: Path,
                                                   stream: dict[str, np.ndarray]) -> None:
    again = make_candidate_stream(builtin_data / "train.json", 64, seed=3, run_id="test")
    assert list(again["sample_id"]) == list(stream["sample_id"])
    assert np.array_equal(again["image"], stream["image"])
    failures = set(stream["truth_failure"].tolist())
    assert "none" in failures and len(failures) >= 3  # 40 % failures of 4 kinds in 64 rows
    assert stream["image"].shape == (64, 128, 128, 3) and stream["mask"].dtype == bool
    good = good_only(stream)
    assert set(good["truth_failure"].tolist()) == {"none"}
    assert 0 < len(good["sample_id"]) < 64
    # rare-boost weighting: rare classes (4 of 12) get 4/7 of the prompts on average
    cats = {c["id"]: c["frequency"] for c in __import__("json").loads(
        (builtin_data / "train.json").read_text())["categories"]}
    rare = np.mean([cats[int(c)] == "r" for c in stream["class_id"]])
    assert rare > 0.4


def test_stream_round_trips_through_npz(tmp_path: Path, stream: dict[str, np.ndarray]) -> None:
    path = tmp_path / "s.npz"
    save_stream(path, stream)
    back = load_stream(path)
    assert set(back) == set(stream)
    for key in stream:
        assert np.array_equal(back[key], np.asarray(stream[key]).astype(back[key].dtype)), key
    assert [len(b["sample_id"]) for b in batches(back, 24)] == [24, 24, 16]


def test_object_noise_touches_only_the_object(stream: dict[str, np.ndarray]) -> None:
    part = take(stream, slice(0, 6))
    assert np.array_equal(add_object_noise(part, 0.0, seed=1)["image"], part["image"])
    weak, strong = (add_object_noise(part, s, seed=1)["image"].astype(int) for s in (0.1, 0.8))
    clean = part["image"].astype(int)
    outside = ~part["mask"]
    assert np.array_equal(weak[outside], clean[outside])
    assert np.array_equal(strong[outside], clean[outside])
    inside = part["mask"]
    assert np.abs(strong - clean)[inside].mean() > 3 * np.abs(weak - clean)[inside].mean() > 0
    assert np.array_equal(add_object_noise(part, 0.8, seed=1)["image"], strong)  # seeded
    with pytest.raises(ValueError, match="sigma"):
        add_object_noise(part, -0.1, seed=1)


def test_acceptance_against_truth_counts_candidates() -> None:
    truth = {"a": "none", "b": "none", "c": "noise", "d": "wrong_class", "e": "none"}
    decisions = [{"sample_id": "a", "accepted": True}, {"sample_id": "b", "accepted": False},
                 {"sample_id": "c", "accepted": True}, {"sample_id": "d", "accepted": False},
                 {"sample_id": "e", "accepted": True}]
    stats = acceptance_against_truth(decisions, truth)
    assert stats["precision"] == pytest.approx(2 / 3)
    assert stats["recall"] == pytest.approx(2 / 3)
    assert stats["accepted_fraction"] == pytest.approx(3 / 5)
    assert stats["good_fraction"] == pytest.approx(3 / 5)
    none = acceptance_against_truth([{"sample_id": "c", "accepted": False}], truth)
    assert math.isnan(none["precision"]) and math.isnan(none["recall"])


def test_candidate_steps_are_exact_and_hide_the_truth(builtin_data: Path, checkpoint: str,
                                                      stream: dict[str, np.ndarray]) -> None:
    job = RunJob(str(builtin_data), seed=0, sizes=SIZES, checkpoint=checkpoint)
    # A filter on a truth column must find no such field: the methods never see the truth.
    trainer = build_finetune_trainer(job, {"method": "field_threshold",
                                           "quality_field": "truth_class_id",
                                           "quality_threshold": 0.0})
    decisions, steps = run_candidate_steps(trainer, stream, 3, 8)
    assert trainer.step == 3 and len(steps) == 3
    assert {s["reason"] for s in steps} == {"invalid_missing_field"}
    assert sum(d["reason"] == "invalid_missing_field" for d in decisions) == sum(
        s["num_candidates"] for s in steps)
    consumed = [d["sample_id"] for d in decisions]
    assert len(set(consumed)) == len(consumed)
    taken = -(-len(consumed) // 8) * 8 + 8  # whole candidate batches, in stream order
    assert set(consumed) <= set(stream["sample_id"][:taken].tolist())
    with pytest.raises(RuntimeError, match="ran out"):
        run_candidate_steps(trainer, take(stream, slice(0, 2)), 5, 8)


def test_finetune_reports_truth_based_selection(builtin_data: Path, checkpoint: str,
                                                stream: dict[str, np.ndarray],
                                                tmp_path: Path) -> None:
    path = tmp_path / "stream.npz"
    save_stream(path, stream)
    spec = MethodSpec("random", "random", {"method": "random"}, random_rate_from="x")
    job = RunJob(str(builtin_data), seed=0, sizes=SIZES, checkpoint=checkpoint,
                 stream_path=str(path), spec=spec, random_p=0.0)
    result = finetune(job)
    assert result["batches"]["acceptance_rate"] == 0.0 and result["random_p"] == 0.0
    assert result["selection"]["accepted"] == 0 and result["selection"]["recall"] == 0.0
    assert result["steps"] == 3 and set(result["metrics"]) == {"segm", "bbox"}
    assert set(result["metrics"]["segm"]) == {"AP", "APr", "APc", "APf"}
    oracle = dataclasses.replace(job, spec=MethodSpec("o", "o", {"method": "accept_all"},
                                                      stream="good"), random_p=None)
    good = finetune(oracle)
    assert good["selection"]["precision"] == 1.0 and good["selection"]["recall"] == 1.0
    with pytest.raises(ValueError, match="random_p"):
        finetune(dataclasses.replace(job, random_p=None))


def test_probe_scoring_restores_the_state(builtin_data: Path, checkpoint: str,
                                          stream: dict[str, np.ndarray]) -> None:
    import copy

    job = RunJob(str(builtin_data), seed=0, sizes=SIZES, checkpoint=checkpoint)
    trainer = build_finetune_trainer(job, {**BSGAL_FIXED, "mode": "faithful"})
    batch = take(good_only(stream), slice(0, 8))
    snapshot = copy.deepcopy(trainer.state_dict())
    first, reason, used = _score_once(trainer, _candidates(trainer, batch))
    assert reason in ("accepted", "rejected_score") and math.isfinite(first) and used
    assert all(p.grad is None for p in trainer.backend.trainable_parameters())
    trainer.load_state_dict(copy.deepcopy(snapshot))
    again, _, used_again = _score_once(trainer, _candidates(trainer, batch))
    assert again == first and [c.sample_id for c in used_again] == [c.sample_id for c in used]
    trainer.load_state_dict(copy.deepcopy(snapshot))
    noisy, _, _ = _score_once(trainer, _candidates(trainer, add_object_noise(batch, 0.8, seed=0)))
    assert noisy != first  # same layout and state, only the object pixels differ


def test_dynamic_acceptance_keeps_about_the_fraction() -> None:
    scores = np.linspace(-1, 1, 400)
    accepted = dynamic_acceptance(scores, 0.25, seed=0)
    assert 0.2 < accepted.mean() < 0.32
    assert accepted[scores > 0.8].mean() > 0.9 and accepted[scores < 0].mean() < 0.05


def test_fidelity_summary_measures_rank_and_sign() -> None:
    rows = [{"faithful": s, "gain": {"0.1": 2 * s}, "bad_fraction": 0.5 - s}
            for s in (-0.3, -0.1, 0.2, 0.4)]
    summary = summarise_fidelity([{"seed": 0, "alphas": [0.1], "rows": rows}])["pooled"]
    assert summary["0.1"]["faithful"]["spearman"] == pytest.approx(1.0)
    assert summary["0.1"]["faithful"]["sign_agreement"] == 1.0
    assert summary["0.1"]["gain_positive"] == 0.5
    assert summary["faithful_vs_good_fraction"] == pytest.approx(1.0)


def test_aggregation_pairs_seeds_and_renders() -> None:
    specs = method_specs(0.8, 0.5)
    names = ("none", "accept_all", "bsgal_faithful_fixed")

    def run(method: str, seed: int, ap: float) -> dict:
        metrics = {k: {m: ap for m in ("AP", "APr", "APc", "APf")} for k in ("segm", "bbox")}
        r = {"method": method, "seed": seed, "metrics": metrics, "wall_s": 10.0,
             "s_per_step": 0.1}
        if method != "none":
            kinds = {"none": (1.0, math.nan), "wrong_class": (0.25 * (1 + seed), 0.9)}
            r["selection"] = {"precision": 0.6, "recall": 1.0, "accepted_fraction": 1.0,
                              "good_fraction": 0.6,
                              "by_kind": {k: {"candidates": 10, "accepted_fraction": a,
                                              "score_auc": auc}
                                          for k, (a, auc) in kinds.items()}}
            r["batches"] = {"acceptance_rate": 1.0, "candidates_per_step": 5.0, "invalid": 0}
        return r

    runs = [run(m, s, base + s * 0.1 + 0.01 * i)
            for i, m in enumerate(names) for s, base in ((0, 0.2), (1, 0.3))]
    summary = aggregate_methods(runs, [s for s in specs if s.name in names])
    assert list(summary) == list(names)
    bsgal = summary["bsgal_faithful_fixed"]
    assert bsgal["segm_APr_minus_none"]["mean"] == pytest.approx(0.02)
    assert bsgal["segm_APr_minus_none"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert bsgal["segm_AP"]["mean"] == pytest.approx(np.mean([0.22, 0.42]))
    table = methods_markdown(summary)
    assert "| BSGAL faithful, fixed threshold −0.05 | 32.0 ± 14.1 |" in table
    kinds = kinds_markdown(summary)
    assert ("| BSGAL faithful, fixed threshold −0.05 | 100 ± 0 % | 38 ± 18 % | 0.90 ± 0.00 |"
            in kinds)
    assert mean_std([1.0, float("nan"), 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5),
                                                  "n": 2}


def test_noise_summary_pairs_levels_by_batch(tmp_path: Path) -> None:
    rows = []
    for b in range(4):
        rows.append({"mode": "faithful", "batch": b, "level": 0.0, "score": 0.2 + 0.1 * b})
        rows.append({"mode": "faithful", "batch": b, "level": 0.8, "score": 0.1 * b - 0.1})
    summary = summarise_noise([{"seed": 0, "levels": [0.0, 0.8], "rows": rows}], 0.5)
    clean, noisy = summary["faithful"]["0.0"], summary["faithful"]["0.8"]
    assert noisy["paired_change_mean"] == pytest.approx(-0.3)
    assert noisy["paired_lower_fraction"] == 1.0
    assert clean["accept_fixed"] == 1.0 and noisy["accept_fixed"] == 0.75  # -0.1 < -0.05
    assert noisy["median"] < clean["median"] and noisy["n"] == 4
    assert clean["accept_dynamic"] + noisy["accept_dynamic"] > 0
    table = noise_markdown(summary)
    assert "| faithful | 0.8 | 4 |" in table and "-0.300 | 100 % | 75 % |" in table
    plot_noise(summary, tmp_path / "noise.png")
    assert (tmp_path / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The BSGAL train step and training loop on the built-in set with the small CPU detector."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks._candidate_stream import real_cutouts
from selector import AcceptAll, BatchSelector, FixedThreshold, build_selector
from trainer.backends import SplitLosses, image_tensor
from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
from trainer.bsgal_step import BsgalStep
from trainer.step import NonFiniteLossError, PastedBatch
from trainer.candidates import cut_out
from trainer.datasets import LvisDataset
from trainer.loop import DetectorTrainer

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def candidates_from_real(ds: LvisDataset, count: int, seed: int = 0, prefix: str = "c",
                         size: int = 96) -> list[dict[str, Any]]:
    """Good candidates: real instances cut out and centred on a white ``size`` canvas."""
    return real_cutouts(ds, count, seed=seed, prefix=prefix, size=size, mask_scores=True)


def bad_candidates(good: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Corrupted copies of a good candidate and the reason each must get."""
    h, w = good["mask"].shape
    return [
        (dict(good, sample_id="bad_empty", mask=np.zeros((h, w), bool)), "invalid_empty_mask"),
        (dict(good, sample_id="bad_full", mask=np.ones((h, w), bool)), "invalid_full_mask"),
        (dict(good, sample_id="bad_size", mask=good["mask"][: h // 2]), "invalid_size_mismatch"),
        (dict(good, sample_id="bad_status", status="invalid_generation_error"),
         "invalid_generation_error"),
        (dict(good, sample_id="bad_class", class_id=999), "invalid_unknown_class"),
    ]


class RecordingBackend:
    """Wraps a backend: records every ``losses`` call and can poison chosen loss pieces.

    ``nan_pieces`` holds ``(group, term, when)``, ``when`` in {"score", "train"}: that piece is
    multiplied by NaN (staying attached to the graph) in scoring or training forwards.
    """

    def __init__(self, inner: TorchvisionMaskRCNN) -> None:
        self.inner = inner
        self.calls: list[tuple[list[torch.Tensor], list[dict], bool]] = []
        self.nan_pieces: list[tuple[str, str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def losses(self, images, targets, *, score_only: bool = False) -> SplitLosses:
        self.calls.append(([i.detach().clone() for i in images],
                           [{k: v.clone() for k, v in t.items()} for t in targets], score_only))
        split = self.inner.losses(images, targets, score_only=score_only)
        for group, term, when in self.nan_pieces:
            if (when == "score") == score_only:
                split.pieces[group][term] = split.pieces[group][term] * float("nan")
        return split

    def real_classification_loss(self, images, targets):
        return self.inner.real_classification_loss(images, targets)


def make_trainer(ds: LvisDataset, *, method: str = "bsgal", mode: str = "faithful",
                 model_seed: int = 0, selector: BatchSelector | None = None,
                 backend: Any = None, **kwargs: Any) -> DetectorTrainer:
    torch.manual_seed(model_seed)
    backend = backend or TorchvisionMaskRCNN.build(ds.num_classes, "small", 128)
    if selector is None and method != "none":
        rare = [c.id for c in ds.categories if c.frequency == "r"]
        params = backend.trainable_parameters()
        selector = build_selector(params, method=method,
                                  **({"rare_class_ids": rare} if method == "bsgal" else {}),
                                  **kwargs.pop("selection", {}))
    settings = dict(batch_size=2, real_batch_size=2, max_pastes_per_image=2, lr=5e-4,
                    warmup_steps=2, total_steps=40, seed=0)
    settings.update(kwargs)
    return DetectorTrainer(backend, ds, selector=selector, mode=mode, **settings)


@pytest.fixture(scope="module")
def train_set(builtin_data: Path) -> LvisDataset:
    return LvisDataset(builtin_data, "train.json", max_images=64)


@pytest.fixture(scope="module")
def good_rows(train_set: LvisDataset) -> list[dict[str, Any]]:
    return candidates_from_real(train_set, 24, seed=1)


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


def test_every_candidate_gets_exactly_one_decision(train_set, good_rows) -> None:
    trainer = make_trainer(train_set)
    bad = bad_candidates(good_rows[0])
    rows = good_rows[:5] + [b for b, _ in bad] + good_rows[5:7]
    result = trainer.train_on_candidates(rows)
    assert [d["sample_id"] for d in result.decisions] == [r["sample_id"] for r in rows]
    by_id = {d["sample_id"]: d for d in result.decisions}
    for row, reason in bad:
        d = by_id[row["sample_id"]]
        assert d["reason"] == reason and not d["accepted"] and math.isnan(d["score"])
        assert d["batch_id"] == "" and d["method"] == "bsgal"
    good = [by_id[r["sample_id"]] for r in good_rows[:7]]
    assert all(d["batch_id"].startswith("rank0-step") for d in good)
    assert {d["batch_id"] for d in good} == {s["batch_id"] for s in result.steps}
    for step in result.steps:
        members = [d for d in good if d["batch_id"] == step["batch_id"]]
        assert len(members) == step["num_candidates"] >= 1
        assert {(d["reason"], d["accepted"], d["step"]) for d in members} == {
            (step["reason"], step["accepted"], step["step"])}
    # Both modes update the cache before scoring, so every scored batch has a finite score.
    scored = [d for d in good if d["reason"] in ("accepted", "rejected_score")]
    assert scored and all(math.isfinite(d["score"]) and -1 <= d["score"] <= 1 for d in scored)
    assert trainer.stream_offset == len(rows) and trainer.step == len(result.steps)
    assert [d["stream_offset"] for d in result.decisions] == list(range(len(rows)))
    again = trainer.train_on_candidates(good_rows[7:9]).decisions
    assert [d["stream_offset"] for d in again] == [len(rows), len(rows) + 1]



def as_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows → a dict of numpy columns (Ray Data's ``batch_format="numpy"``)."""
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        elif isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.array(values)
    return out


def test_column_batches_give_the_same_decisions_as_rows(train_set, good_rows) -> None:
    rows = good_rows[:4]
    a = make_trainer(train_set).train_on_candidates(rows).decisions
    b = make_trainer(train_set).train_on_candidates(as_columns(rows)).decisions
    assert a == b


def _pasted_batch(trainer: DetectorTrainer, rows: list[dict[str, Any]]):
    """Paste ``rows`` (one per image) onto the trainer's next real images, as a step does."""
    samples = [trainer.real[i] for i in trainer.sampler.next_indices(len(rows))]
    cands = [cut_out(i, r, trainer.label_of[r["class_id"]]) for i, r in enumerate(rows)]
    pasted = [trainer.paster.paste(s, [c]) for s, c in zip(samples, cands)]
    real_test = [trainer.real[i] for i in trainer.test_sampler.sample(
        [c.class_id for c in cands], 2)]
    return PastedBatch(pasted, cands, [c.class_id for c in cands], real_test, {})


@pytest.mark.parametrize("threshold, accepted", [(1.5, False), (-1.5, True)])
def test_faithful_trains_on_pasted_if_accepted_else_on_original_pixels(
        train_set, good_rows, threshold, accepted) -> None:
    torch.manual_seed(0)
    backend = RecordingBackend(TorchvisionMaskRCNN.build(train_set.num_classes))
    selector = build_selector(backend.trainable_parameters(), method="bsgal",
                              fixed_threshold=threshold)
    trainer = make_trainer(train_set, backend=backend, selector=selector)
    batch = _pasted_batch(trainer, good_rows[:2])
    pasted = batch.pasted
    assert all(p.num_generated == 1 for p in pasted)
    result = BsgalStep(backend, selector).run(0, batch)
    outcome = result.verdict
    assert outcome is not None and outcome.accepted is accepted
    assert outcome.reason == ("accepted" if accepted else "rejected_score")
    assert math.isfinite(outcome.score) and outcome.threshold == threshold
    assert set(result.decisions.values()) == {outcome}
    (score_images, _, score_only), (images, targets, train_only) = backend.calls
    assert score_only and not train_only
    for p, img in zip(pasted, score_images):
        assert torch.equal(img, image_tensor(p.image))
    for p, img, target in zip(pasted, images, targets):
        expected = p.image if accepted else p.original["image"]
        assert torch.equal(img, image_tensor(expected))
        assert int(target["generated"].sum()) == (1 if accepted else 0)
        if not accepted:  # the original pixels: no pasted pixel is left
            assert not torch.equal(img, image_tensor(p.image))
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# Bad input and NaN
# --------------------------------------------------------------------------------------------


def test_nan_generated_loss_is_an_invalid_decision_and_the_step_goes_on(
        train_set, good_rows) -> None:
    torch.manual_seed(0)
    backend = RecordingBackend(TorchvisionMaskRCNN.build(train_set.num_classes))
    backend.nan_pieces.append(("generated", "loss_classifier", "score"))
    trainer = make_trainer(train_set, backend=backend)
    before = [p.detach().clone() for p in backend.trainable_parameters()]
    result = trainer.train_on_candidates(good_rows[:4])
    assert {d["reason"] for d in result.decisions} == {"invalid_nan_loss"}
    assert all(s["trained_on"] == "original" for s in result.steps)
    after = backend.trainable_parameters()
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # it did train
    assert trainer.selector.cache.num_updates == len(result.steps)  # the cache is clean
    assert math.isfinite(trainer.selector.cache.norm())


def test_nan_training_loss_is_reported_with_step_and_term(train_set, good_rows) -> None:
    torch.manual_seed(0)
    backend = RecordingBackend(TorchvisionMaskRCNN.build(train_set.num_classes))
    trainer = make_trainer(train_set, backend=backend)
    trainer.train_real_step()
    backend.nan_pieces.append(("real_foreground", "loss_mask", "train"))
    before = [p.detach().clone() for p in backend.trainable_parameters()]
    with pytest.raises(NonFiniteLossError, match=r"step 1: training loss term 'loss_mask'"):
        trainer.train_on_candidates(good_rows[:4])
    assert all(torch.equal(a, b) for a, b in zip(backend.trainable_parameters(), before))


# --------------------------------------------------------------------------------------------
# Baselines, evaluation
# --------------------------------------------------------------------------------------------


def test_baselines_decide_without_gradients(train_set, good_rows) -> None:
    torch.manual_seed(0)
    backend = RecordingBackend(TorchvisionMaskRCNN.build(train_set.num_classes))
    trainer = make_trainer(train_set, backend=backend,
                           selector=BatchSelector(AcceptAll(), method="accept_all"))
    result = trainer.train_on_candidates(good_rows[:4])
    assert {d["reason"] for d in result.decisions} == {"accepted"}
    assert all(math.isnan(d["score"]) for d in result.decisions)
    assert all(not score_only for _, _, score_only in backend.calls)  # no scoring pass
    trainer = make_trainer(train_set, method="field_threshold",
                           selection={"field": "mask_score", "field_threshold": 2.0})
    result = trainer.train_on_candidates(good_rows[:4])
    assert {d["reason"] for d in result.decisions} == {"rejected_score"}
    with pytest.raises(ValueError, match="real data only"):
        make_trainer(train_set, method="none").train_on_candidates(good_rows[:2])


def test_lookahead_baseline_scores_with_the_exact_gain(train_set, good_rows) -> None:
    from selector import exact_lookahead_gain
    from trainer.real_data import pasted_inputs, real_inputs

    torch.manual_seed(0)
    backend = TorchvisionMaskRCNN.build(train_set.num_classes)
    selector = BatchSelector(FixedThreshold(0.0, name="lookahead"), method="lookahead")
    trainer = make_trainer(train_set, backend=backend, selector=selector)
    pool = [cut_out(i, row, trainer.label_of[int(row["class_id"])])
            for i, row in enumerate(good_rows[:3])]
    batch = trainer.paste_next(pool)
    assert batch.real_test and sum(p.num_generated for p in batch.pasted) > 0
    lr = trainer.optimizer.param_groups[0]["lr"]
    pasted = pasted_inputs(batch.pasted, backend.device)
    real = real_inputs(batch.real_test, backend.device)
    torch.manual_seed(1)  # the same RoI sampling for the direct computation and the step
    expected = exact_lookahead_gain(
        backend.trainable_parameters(),
        lambda: backend.losses(*pasted, score_only=True).generated[backend.classification_term],
        lambda: backend.real_classification_loss(*real),
        lr=lr, buffers=list(backend.module.buffers())).gain
    torch.manual_seed(1)
    outcome = trainer.train_pasted(batch)[0].verdict
    assert expected != 0.0 and math.isfinite(expected)
    assert outcome.score == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert outcome.reason == ("accepted" if expected >= 0 else "rejected_score")


def test_evaluation_runs_the_lvis_evaluator(train_set, builtin_data) -> None:
    val = LvisDataset(builtin_data, "val.json")
    trainer = make_trainer(train_set, method="none", val_set=val, max_eval_images=6, ema=0.9,
                           eval_every=2)
    assert "metrics" not in trainer.train_real_step()
    log = trainer.train_real_step()  # the second step is followed by an evaluation
    assert trainer.metrics_log == [{"step": 2, **log["metrics"]}]
    metrics = trainer.evaluate()
    for iou in ("bbox", "segm"):
        assert {"AP", "APr", "APc", "APf"} <= set(metrics[iou])
        assert all(-1.0 <= v <= 1.0 for v in metrics[iou].values())
    # EMA weights are swapped in for evaluation and the training weights come back.
    params = [p.detach().clone() for p in trainer.backend.trainable_parameters()]
    trainer.evaluate(max_images=2)
    assert all(torch.equal(a, b) for a, b in zip(trainer.backend.trainable_parameters(), params))


# --------------------------------------------------------------------------------------------
# Training and checkpoints
# --------------------------------------------------------------------------------------------


def _fixed_batch_loss(trainer: DetectorTrainer, samples: list[dict]) -> float:
    from trainer.real_data import real_inputs

    torch.manual_seed(99)
    with torch.no_grad():
        return float(trainer.backend.losses(*real_inputs(samples, "cpu")).total())


def test_fifty_steps_lower_the_loss(builtin_data) -> None:
    small = LvisDataset(builtin_data, "train.json", max_images=4)
    trainer = make_trainer(small, method="none", batch_size=2, lr=1e-3, warmup_steps=5,
                           total_steps=50, repeat_factor_threshold=0.0)
    samples = [small[i] for i in range(4)]
    before = _fixed_batch_loss(trainer, samples)
    losses = [trainer.train_real_step()["loss"] for _ in range(50)]
    after = _fixed_batch_loss(trainer, samples)
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_checkpoint_resume_gives_the_same_next_decisions(train_set, good_rows, tmp_path
                                                         ) -> None:
    batches = [good_rows[i:i + 4] for i in range(0, 16, 4)]
    settings = dict(ema=0.5, selection={"threshold": "dynamic",
                                                   "keep_fraction": 0.5})
    straight = make_trainer(train_set, **settings)
    expected = [straight.train_on_candidates(b).decisions for b in batches]

    first = make_trainer(train_set, **settings)
    for b in batches[:2]:
        first.train_on_candidates(b)
    path = tmp_path / "ckpt.pt"
    torch.save(first.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["stream_offset"] == 8 and state["selector"]["cache"]["num_updates"] >= 2
    assert state["selector"]["policy"]["scores"]  # the dynamic threshold's window
    # Unrelated global random draws after saving must not matter after loading.
    torch.rand(5)
    np.random.rand(3)
    resumed = make_trainer(train_set, model_seed=123, **settings)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.step == first.step and resumed.stream_offset == 8
    got = [resumed.train_on_candidates(b).decisions for b in batches[2:]]
    assert got == expected[2:]
    for a, b in zip(straight.backend.module.state_dict().values(),
                    resumed.backend.module.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_from_another_setup_is_refused(train_set, tmp_path) -> None:
    trainer = make_trainer(train_set)
    path = tmp_path / "ckpt.pt"
    torch.save(trainer.state_dict(), path)
    with pytest.raises(ValueError, match="method='accept_all'"):
        make_trainer(train_set, method="accept_all").load_state_dict(
            torch.load(path, weights_only=True))


def test_the_removed_efficient_mode_says_why_and_what_to_use() -> None:
    with pytest.raises(ValueError, match="efficient mode was removed.*granularity=instance"):
        BsgalStep(None, None, "efficient")  # type: ignore[arg-type]


def test_real_warmup_steps_then_candidate_batches_step_by_step(train_set, good_rows) -> None:
    # The calls a training worker makes (pipeline.run.train_worker): real-only warmup steps,
    # then each candidate batch used up one optimizer step at a time, then real-only steps.
    trainer = make_trainer(train_set)
    batches = [good_rows[0:3], good_rows[3:6]]
    while trainer.step < 2:
        trainer.train_real_step()
    decisions = []
    for batch in batches:
        pool = trainer.take_candidates(batch)
        while not pool.done:
            trainer.step_candidates(pool)
        decisions.extend(pool.decisions())
    while trainer.step < 6:
        trainer.train_real_step()
    assert [d["sample_id"] for d in decisions] == [r["sample_id"] for r in good_rows[:6]]
    assert min(d["step"] for d in decisions) == 2  # nothing before the warmup ended
    assert trainer.step >= 6

"""Building the trainer from config-named settings (what pipeline/ passes)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from pipeline.config import SelectionConfig, TrainingConfig, load_config
from pipeline.run.train_worker import trainer_settings
from tests.conftest import DEMO_CONFIG
from trainer.datasets import LvisDataset
from trainer.defaults import SELECTION_DEFAULTS, TRAINING_DEFAULTS
from trainer.factory import IGNORED_TRAINING_KEYS, build_trainer, load_initial_weights

TRAIN_IMAGES = 24  # the conftest ``train_set`` fixture: the first 24 training images


def test_demo_config_builds_the_instance_composite_trainer(train_set: LvisDataset) -> None:
    cfg = load_config(DEMO_CONFIG)
    trainer = build_trainer(train_set, training=trainer_settings(cfg),
                            selection=dataclasses.asdict(cfg.selection), seed=cfg.seed)
    assert trainer.granularity == "instance" and trainer.method == "composite"
    assert trainer.selector.threshold.keep_fraction == cfg.selection.keep_fraction
    assert trainer.selector.threshold.window.window_steps == cfg.selection.threshold_window_steps
    assert trainer.step_fn.calibration_pastes == 0  # the percentile pastes no real pieces
    assert trainer.selector.caches.mode == "average"


def test_batch_config_sections_build_a_trainer(train_set: LvisDataset) -> None:
    cfg = load_config(DEMO_CONFIG, ["selection.granularity=batch", "selection.method=bsgal",
                                    "selection.threshold=dynamic",
                                    "selection.rare_min_accept_rate=0.3", "training.ema=0.99"])
    # What the Ray Train worker passes: the training section less the pipeline's own keys.
    trainer = build_trainer(train_set, training=trainer_settings(cfg),
                            selection=dataclasses.asdict(cfg.selection), seed=cfg.seed)
    assert trainer.mode == "faithful" and trainer.method == "bsgal"
    assert trainer.selector.policy.name == "rare_class_min_accept_rate"
    assert trainer.ema is not None and trainer.batch_size == cfg.training.batch_size
    # Faithful BSGAL caches a gradient over every trainable parameter.
    assert trainer.selector.cache.numel == sum(
        p.numel() for p in trainer.backend.trainable_parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.training.lr / cfg.training.warmup_steps)  # first warmup step


def _keyword_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_trainer_defaults_are_the_config_defaults() -> None:
    from selector import build_selection_policy, build_selector
    from trainer.backends import build_backend
    from trainer.backends.torchvision_maskrcnn import TorchvisionMaskRCNN
    from trainer.factory import build_detector
    from trainer.loop import DetectorTrainer
    from trainer.optim import WarmupCosine, build_optimizer
    from trainer.sampling import RepeatFactorSampler

    training = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    selection = {f.name: f.default if f.default_factory is dataclasses.MISSING
                 else f.default_factory() for f in dataclasses.fields(SelectionConfig)}
    # The one table in trainer/ holds the config's values, for every key the trainer reads;
    # the other keys the worker passes are accepted and left to the pipeline.
    assert TRAINING_DEFAULTS == {k: training[k] for k in TRAINING_DEFAULTS}
    assert SELECTION_DEFAULTS == selection
    passed = set(trainer_settings(load_config()))
    assert set(TRAINING_DEFAULTS) | IGNORED_TRAINING_KEYS == passed
    # Keyword defaults in trainer/ and selector/ for the same settings: (callable, section,
    # parameter name -> config key where they differ, the config keys compared or None: all
    # that the callable shares with the section).
    checks = [
        (DetectorTrainer, training, {"total_steps": "steps"}, None),
        (DetectorTrainer, selection, {}, {"mode", "real_batch_size"}),
        (build_detector, training, {}, None),
        (build_backend, training, {}, {"arch", "image_size", "amp"}),  # device: resolved
        (TorchvisionMaskRCNN.build, training, {}, {"arch", "image_size", "amp"}),
        (build_optimizer, training, {"name": "optimizer"}, None),
        (WarmupCosine, training, {}, None),
        (RepeatFactorSampler, training, {"threshold": "repeat_factor_threshold"}, None),
        (build_selector, selection, {}, None),
        (build_selection_policy, selection, {}, None),  # None there: required when used
    ]
    compared = set()
    for fn, section, renamed, only in checks:
        for name, value in _keyword_defaults(fn).items():
            key = renamed.get(name, name)
            if key in section and value is not None and (only is None or key in only):
                assert value == section[key], (fn, name, value, section[key])
                compared.add((fn.__qualname__, key))
    assert {("DetectorTrainer", "steps"), ("DetectorTrainer", "lr"), ("DetectorTrainer", "mode"),
            ("build_detector", "device"), ("build_selection_policy", "fixed_threshold"),
            ("build_selector", "momentum")} <= compared


def test_instance_composite_caches_the_box_classifier_gradient_per_class(
        train_set: LvisDataset) -> None:
    from selector.class_sketch import SketchedClassCaches

    default = build_trainer(train_set, selection={"granularity": "instance",
                                                  "method": "composite"})
    assert isinstance(default.selector.caches, SketchedClassCaches)
    assert default.step_fn.real_gradients == "training_batch"
    trainer = build_trainer(train_set, selection={"granularity": "instance",
                                                  "method": "composite", "cache_sketch": "none"})
    caches = trainer.selector.caches
    head = trainer.backend.classifier_parameters()
    assert sum(p.numel() for p in caches.params) == sum(p.numel() for p in head)
    assert sum(p.numel() for p in head) < sum(
        p.numel() for p in trainer.backend.trainable_parameters()) / 2
    assert trainer.selector.gates.minimums == {"mask_score": 0.8}
    with pytest.raises(ValueError, match="score_parameters=heads"):
        build_trainer(train_set, selection={"granularity": "instance", "method": "bsgal",
                                            "score_parameters": "all"})
    everything = build_trainer(train_set, selection={
        "granularity": "instance", "method": "bsgal", "score_parameters": "all",
        "cache_sketch": "none", "real_gradients": "test_batch"})
    assert len(everything.selector.caches.params) == len(
        everything.backend.trainable_parameters())
    assert everything.selector.gates is None


def test_unknown_settings_are_named(train_set: LvisDataset) -> None:
    with pytest.raises(ValueError, match="unknown training setting.*'stpes'"):
        build_trainer(train_set, training={"stpes": 3})
    with pytest.raises(ValueError, match="unknown selection setting.*'treshold'"):
        build_trainer(train_set, selection={"treshold": "fixed"})
    with pytest.raises(ValueError, match="detector backend 'mmdet' is unknown"):
        build_trainer(train_set, training={"backend": "mmdet"})


def test_init_checkpoint_loads_matching_weights(train_set: LvisDataset, tmp_path) -> None:
    trainer = build_trainer(train_set, selection={"method": "accept_all"}, seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save(trainer.state_dict(), path)
    other = build_trainer(train_set, selection={"method": "accept_all"}, seed=2,
                          training={"init_checkpoint": str(path)})
    for a, b in zip(trainer.backend.module.state_dict().values(),
                    other.backend.module.state_dict().values()):
        assert torch.equal(a, b)
    # A bare state dict for another number of classes: the classifier is skipped and listed.
    state = trainer.backend.module.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 256)
    torch.save(state, tmp_path / "bare.pt")
    report = load_initial_weights(other.backend.module, str(tmp_path / "bare.pt"))
    assert report["skipped"] == ["roi_heads.box_predictor.cls_score.weight"]
    torch.save({"something": torch.zeros(1)}, tmp_path / "unrelated.pt")
    with pytest.raises(ValueError, match="no entry matches"):
        load_initial_weights(other.backend.module, str(tmp_path / "unrelated.pt"))


def test_sgd_with_gradient_clipping_bounds_the_update(train_set: LvisDataset) -> None:
    trainer = build_trainer(train_set, training={
        "optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0,
        "warmup_steps": 0, "grad_clip": 1e-3, "batch_size": 2}, selection={"method": "none"})
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    before = torch.cat([p.detach().reshape(-1) for p in trainer.backend.trainable_parameters()])
    log = trainer.train_real_step()
    after = torch.cat([p.detach().reshape(-1) for p in trainer.backend.trainable_parameters()])
    assert log["grad_norm"] > 1e-3  # the raw gradient was larger than the clip ...
    assert float(torch.linalg.vector_norm(after - before)) <= 1e-3 * 1.001  # ... the step not


def test_warmup_then_cosine_schedule() -> None:
    from trainer.optim import WarmupCosine

    schedule = WarmupCosine(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12) and schedule(500) == schedule(110)
    assert WarmupCosine(0, 100, "constant")(50) == 1.0

"""Build a `DetectorTrainer` from plain settings named like the run config's sections.

``training`` takes the keys of ``pipeline.config.TrainingConfig`` and ``selection`` those of
``SelectionConfig`` (pass ``dataclasses.asdict(cfg.training)``); no config class is imported
here, so the arrow stays pipeline → trainer. A key left out takes its default from
`trainer.defaults` (the config's defaults). Keys that belong to the pipeline
(``warmup_real_steps``, ``checkpoint_every``, ``num_workers``, ``use_gpu``; ``steps`` is also
used here, as the schedule length) are accepted; unknown keys are an error naming them.
Example::

    trainer = build_trainer(train_set, val_set, training={"arch": "small", "lr": 5e-4},
                            selection={"method": "bsgal", "mode": "faithful"}, seed=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from selector import build_selector
from selector.class_sketch import SketchedClassCaches
from selector.instance_selector import ClassGradientCaches, InstanceSelector, QualityGates
from selector.instance_thresholds import (
    CalibratedThreshold,
    FixedInstanceThreshold,
    InstanceThreshold,
    PerClassPercentileThreshold,
)
from selector.methods import SelectionMethod, calibratable, resolved_threshold, selection_method
from trainer.backends import build_backend
from trainer.backends.base import DetectorBackend
from trainer.datasets.lvis_format import LvisDataset
from trainer.defaults import SELECTION_DEFAULTS, TRAINING_DEFAULTS
from trainer.instance_signals import score_signal
from trainer.loop import DetectorTrainer

#: ``training`` keys that the caller uses (the pipeline's); accepted here and not read.
IGNORED_TRAINING_KEYS = frozenset({"warmup_real_steps", "checkpoint_every", "num_workers",
                                   "use_gpu"})
TRAINING_KEYS = frozenset(TRAINING_DEFAULTS) | IGNORED_TRAINING_KEYS
SELECTION_KEYS = frozenset(SELECTION_DEFAULTS)


def _check_keys(settings: Mapping[str, Any], valid: frozenset[str], section: str) -> None:
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {unknown}; valid: {sorted(valid)}")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_initial_weights(module: torch.nn.Module, path: str) -> dict[str, list[str]]:
    """Load weights from a saved `DetectorTrainer.state_dict` (its ``model``) or a bare state
    dict.

    Entries whose name or shape does not fit (e.g. a classifier for another number of classes)
    are skipped and listed. Loaded with ``weights_only=True``.

    Returns:
        ``{"loaded": [...], "skipped": [...]}`` parameter/buffer names.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict or bsgal checkpoint")
    own = module.state_dict()
    fitting = {k: v for k, v in state.items()
               if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise ValueError(f"{path}: no entry matches this model's parameters by name and shape; "
                         "is it a checkpoint of another architecture?")
    module.load_state_dict(fitting, strict=False)
    return {"loaded": sorted(fitting), "skipped": sorted(set(state) - set(fitting))}


def initial_weights_fit(path: str, num_classes: int, *, backend: str, arch: str,
                        image_size: int) -> tuple[int, int, list[str]]:
    """How much of the weights at ``path`` `load_initial_weights` would load into the detector
    the settings build: (entries that fit by name and shape, the model's entries, a few of
    the file's entries that do not fit). The model is built on the meta device (no memory,
    no weights); the file is read with ``weights_only=True`` and memory-mapped."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict or bsgal checkpoint")
    with torch.device("meta"):
        own = build_backend(backend, num_classes, arch, image_size, torch.device("meta"),
                            False).module.state_dict()
    fitting = [k for k, v in state.items() if k in own and hasattr(v, "shape")
               and tuple(v.shape) == tuple(own[k].shape)]
    return len(fitting), len(own), sorted(set(state) - set(fitting))[:3]


def build_detector(num_classes: int, *, backend: str = TRAINING_DEFAULTS["backend"],
                   arch: str = TRAINING_DEFAULTS["arch"],
                   image_size: int = TRAINING_DEFAULTS["image_size"],
                   device: str = TRAINING_DEFAULTS["device"],
                   amp: bool = TRAINING_DEFAULTS["amp"],
                   init_checkpoint: str | None = TRAINING_DEFAULTS["init_checkpoint"]
                   ) -> DetectorBackend:
    """The detector backend, on its device, optionally started from ``init_checkpoint``."""
    detector = build_backend(backend, num_classes, arch, image_size, resolve_device(device), amp)
    if init_checkpoint:
        load_initial_weights(detector.module, init_checkpoint)
    return detector


def build_trainer(train_set: LvisDataset, val_set: LvisDataset | None = None, *,
                  training: Mapping[str, Any] | None = None,
                  selection: Mapping[str, Any] | None = None, seed: int = 0, rank: int = 0,
                  max_eval_images: int | None = None,
                  detector: DetectorBackend | None = None) -> DetectorTrainer:
    """A trainer (detector, selector, loop) from ``training``/``selection`` settings.

    ``detector`` may be given to reuse an existing backend (then the detector keys of
    ``training`` are ignored). Rare classes for ``rare_min_accept_rate`` are the split's
    categories of frequency ``"r"``.
    """
    training = dict(training or {})
    selection = dict(selection or {})
    _check_keys(training, TRAINING_KEYS, "training")
    _check_keys(selection, SELECTION_KEYS, "selection")
    t = {**TRAINING_DEFAULTS, **training}
    s = {**SELECTION_DEFAULTS, **selection}
    if detector is None:
        torch.manual_seed(seed)
        detector = build_detector(
            train_set.num_classes, backend=t["backend"], arch=t["arch"],
            image_size=t["image_size"], device=t["device"], amp=t["amp"],
            init_checkpoint=t["init_checkpoint"])
    steps = int(t["steps"])
    rare_rate = float(s["rare_min_accept_rate"])
    if s["granularity"] == "instance":
        return _trainer(detector, train_set, val_set, t, s, steps, max_eval_images, seed, rank,
                        build_instance_selector(detector, s, seed * 1000 + rank))
    # Batch-level BSGAL scores over every trainable parameter (the reference).
    selector = build_selector(
        detector.trainable_parameters(),
        method=s["method"],
        score=s["score"],
        cache_update=s["cache_update"],
        momentum=s["momentum"],
        cache_dtype=s["cache_dtype"],
        cache_sync=s["cache_sync"],
        threshold=s["threshold"],
        fixed_threshold=s["fixed_threshold"],
        keep_fraction=s["keep_fraction"],
        keep_fraction_start=s["keep_fraction_start"],
        keep_fraction_end=s["keep_fraction_end"],
        total_steps=steps,
        window=s["window"],
        rare_class_ids=[c.id for c in train_set.categories if c.frequency == "r"],
        rare_min_accept_rate=rare_rate if rare_rate > 0 else None,
        random_p=s["random_p"],
        seed=seed * 1000 + rank,
        field=s["quality_field"],
        field_threshold=s["quality_threshold"],
    )
    return _trainer(detector, train_set, val_set, t, s, steps, max_eval_images, seed, rank,
                    selector)


def build_instance_selector(detector: DetectorBackend, s: Mapping[str, Any],
                            seed: int) -> InstanceSelector | None:
    """The instance-level selector of ``selection`` settings ``s`` (None for ``none``): what
    it holds follows the method's description (`selector.methods`) and its signal
    (`trainer.instance_signals`)."""
    spec = selection_method("instance", s["method"])
    if not spec.trains_on_generated:
        return None
    caches = threshold = gates = None
    if spec.signal is not None and score_signal(spec.signal).uses_caches:
        if s["cache_sketch"] == "input_basis":
            caches = SketchedClassCaches(s["sketch_rank"], mode=s["class_cache_update"],
                                         momentum=s["momentum"], dtype=s["cache_dtype"])
        else:
            params = (detector.classifier_parameters() if s["score_parameters"] == "heads"
                      else detector.trainable_parameters())
            caches = ClassGradientCaches(params, mode=s["class_cache_update"],
                                         momentum=s["momentum"], dtype=s["cache_dtype"])
    if spec.thresholded:
        threshold = build_instance_threshold(s, spec)
    if spec.gated:
        gates = QualityGates(s["quality_gates"])
    return InstanceSelector(spec.name, gates=gates, threshold=threshold, caches=caches,
                            random_p=s["random_p"], seed=seed)


def build_instance_threshold(s: Mapping[str, Any], spec: SelectionMethod) -> InstanceThreshold:
    """The instance-level threshold of ``selection`` settings ``s`` (``threshold: auto`` as
    `selector.methods.resolved_threshold` says)."""
    name = resolved_threshold("instance", s["threshold"],
                              calibratable=calibratable(spec, s["score_parameters"]))
    if name == "calibrated":
        return CalibratedThreshold(s["alpha"], window_steps=s["threshold_window_steps"],
                                   min_reference=s["calibration_min_reference"])
    if name == "dynamic":
        return PerClassPercentileThreshold(s["keep_fraction"],
                                           window_steps=s["threshold_window_steps"],
                                           per_class=s["per_class_threshold"])
    if name == "fixed":
        return FixedInstanceThreshold(s["fixed_threshold"])
    raise ValueError(f"selection.threshold {s['threshold']!r} is not an instance-level "
                     "threshold; use calibrated, dynamic or fixed")


def _trainer(detector: DetectorBackend, train_set: LvisDataset, val_set: LvisDataset | None,
             t: Mapping[str, Any], s: Mapping[str, Any], steps: int,
             max_eval_images: int | None, seed: int, rank: int,
             selector: Any) -> DetectorTrainer:
    return DetectorTrainer(
        detector, train_set, selector=selector, mode=s["mode"],
        score_parameters=s["score_parameters"], batch_size=t["batch_size"],
        real_batch_size=s["real_batch_size"], max_pastes_per_image=t["max_pastes_per_image"],
        optimizer=t["optimizer"], lr=t["lr"], weight_decay=t["weight_decay"],
        momentum=t["momentum"], warmup_steps=t["warmup_steps"], total_steps=steps,
        schedule=t["schedule"], grad_clip=t["grad_clip"], ema=t["ema"],
        repeat_factor_threshold=t["repeat_factor_threshold"], val_set=val_set,
        eval_every=t["eval_every"], max_eval_images=max_eval_images, seed=seed, rank=rank,
        real_gradients=s["real_gradients"], topup_images=s["topup_images"],
        cache_max_age=s["cache_max_age"], basis_images=s["basis_images"],
        basis_refresh_steps=s["basis_refresh_steps"], calibration_pastes=s["calibration_pastes"])

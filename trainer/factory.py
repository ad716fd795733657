"""Build a `DetectorTrainer` from plain settings named like the run config's sections.

``training`` takes the keys of ``pipeline.config.TrainingConfig`` and ``selection`` those of
``SelectionConfig`` (pass ``dataclasses.asdict(cfg.training)``); no config class is imported
here, so the arrow stays pipeline → trainer. Keys that belong to the pipeline
(``steps`` is used as the schedule length; ``warmup_real_steps``, ``checkpoint_every``,
``num_workers``, ``use_gpu`` are the caller's) are accepted; unknown keys are an error naming
them. Example::

    trainer = build_trainer(train_set, val_set, training={"arch": "small", "lr": 5e-4},
                            selection={"method": "bsgal", "mode": "faithful"}, seed=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from selector import build_selector
from trainer.backends import build_backend
from trainer.backends.base import DetectorBackend
from trainer.datasets.lvis_format import LvisDataset
from trainer.loop import DetectorTrainer

TRAINING_KEYS = frozenset({
    "backend", "arch", "image_size", "batch_size", "steps", "warmup_real_steps", "optimizer",
    "lr", "weight_decay", "momentum", "warmup_steps", "schedule", "grad_clip", "ema",
    "max_pastes_per_image", "repeat_factor_threshold", "eval_every", "checkpoint_every",
    "init_checkpoint", "device", "amp", "num_workers", "use_gpu",
})
SELECTION_KEYS = frozenset({
    "method", "mode", "score", "cache_update", "momentum", "cache_dtype", "cache_sync",
    "threshold", "fixed_threshold", "keep_fraction", "keep_fraction_start", "keep_fraction_end",
    "window", "rare_min_accept_rate", "random_p", "quality_field", "quality_threshold",
    "real_batch_size",
})


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
    """Load weights from a bsgal checkpoint (its ``model``) or a bare state dict.

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


def build_detector(num_classes: int, *, backend: str = "torchvision", arch: str = "small",
                   image_size: int = 128, device: str = "auto", amp: bool = False,
                   init_checkpoint: str | None = None) -> DetectorBackend:
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
    if detector is None:
        torch.manual_seed(seed)
        detector = build_detector(
            train_set.num_classes, backend=training.get("backend", "torchvision"),
            arch=training.get("arch", "small"), image_size=training.get("image_size", 128),
            device=training.get("device", "auto"), amp=training.get("amp", False),
            init_checkpoint=training.get("init_checkpoint"))
    steps = int(training.get("steps", 300))
    method = selection.get("method", "bsgal")
    rare_rate = float(selection.get("rare_min_accept_rate", 0.0))
    mode = selection.get("mode", "faithful")
    # Faithful BSGAL scores over every trainable parameter (the reference); efficient mode over
    # the box classifier, whose gradients a short backward gives (see trainer.bsgal_step).
    score_params = (detector.classifier_parameters() if mode == "efficient"
                    else detector.trainable_parameters())
    selector = build_selector(
        score_params,
        method=method,
        score=selection.get("score", "cosine"),
        cache_update=selection.get("cache_update", "momentum"),
        momentum=selection.get("momentum", 0.1),
        cache_dtype=selection.get("cache_dtype", "float32"),
        cache_sync=selection.get("cache_sync", "per_worker"),
        threshold=selection.get("threshold", "fixed"),
        fixed_threshold=selection.get("fixed_threshold", -0.05),
        keep_fraction=selection.get("keep_fraction", 0.5),
        keep_fraction_start=selection.get("keep_fraction_start", 0.5),
        keep_fraction_end=selection.get("keep_fraction_end", 0.5),
        total_steps=steps,
        window=selection.get("window", 1000),
        rare_class_ids=[c.id for c in train_set.categories if c.frequency == "r"],
        rare_min_accept_rate=rare_rate if rare_rate > 0 else None,
        random_p=selection.get("random_p", 0.5),
        seed=seed * 1000 + rank,
        field=selection.get("quality_field", "mask_score"),
        field_threshold=selection.get("quality_threshold", 0.5),
    )
    return DetectorTrainer(
        detector, train_set, selector=selector, mode=mode,
        batch_size=training.get("batch_size", 4),
        real_batch_size=selection.get("real_batch_size", 4),
        max_pastes_per_image=training.get("max_pastes_per_image", 3),
        optimizer=training.get("optimizer", "adamw"), lr=training.get("lr", 1e-4),
        weight_decay=training.get("weight_decay", 1e-4),
        momentum=training.get("momentum", 0.9),
        warmup_steps=training.get("warmup_steps", 50), total_steps=steps,
        schedule=training.get("schedule", "cosine"), grad_clip=training.get("grad_clip", 10.0),
        ema=training.get("ema", 0.0),
        repeat_factor_threshold=training.get("repeat_factor_threshold", 0.001),
        val_set=val_set, eval_every=training.get("eval_every", 0),
        max_eval_images=max_eval_images, seed=seed, rank=rank)

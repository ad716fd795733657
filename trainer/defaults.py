"""The defaults of the run config's ``training`` and ``selection`` keys, as trainer/ applies them.

The values are those of ``pipeline.config.TrainingConfig`` and ``SelectionConfig`` (the source of
truth for a run). trainer/ cannot import pipeline (the arrow is pipeline → trainer), so they are
written here once for `trainer.factory.build_trainer`, `trainer.factory.build_detector` and the
keyword defaults of `trainer.loop.DetectorTrainer`; tests/test_trainer_factory.py checks that
they equal the config's. Keys the trainer does not read (the pipeline's own) are not listed.
"""

from __future__ import annotations

from typing import Any

#: ``training`` keys read by the trainer and their defaults.
TRAINING_DEFAULTS: dict[str, Any] = {
    "backend": "torchvision",
    "arch": "small",
    "image_size": 128,
    "batch_size": 4,
    "steps": 300,
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "warmup_steps": 50,
    "schedule": "cosine",
    "grad_clip": 10.0,
    "ema": 0.0,
    "max_pastes_per_image": 3,
    "repeat_factor_threshold": 0.001,
    "eval_every": 0,
    "init_checkpoint": None,
    "device": "auto",
    "amp": False,
}

#: ``selection`` keys and their defaults (all of them are read).
SELECTION_DEFAULTS: dict[str, Any] = {
    "granularity": "batch",
    "method": "bsgal",
    "mode": "faithful",
    "score": "cosine",
    "cache_update": "momentum",
    "momentum": 0.1,
    "cache_dtype": "float32",
    "cache_sync": "per_worker",
    "threshold": "auto",
    "fixed_threshold": -0.05,
    "keep_fraction": 0.5,
    "keep_fraction_start": 0.5,
    "keep_fraction_end": 0.5,
    "window": 1000,
    "alpha": 0.1,
    "threshold_window_steps": 100,
    "calibration_min_reference": 10,
    "calibration_pastes": 4,
    "rare_min_accept_rate": 0.0,
    "random_p": 0.5,
    "quality_field": "mask_score",
    "quality_threshold": 0.5,
    "real_batch_size": 4,
    "quality_gates": {"mask_score": 0.8},
    "score_parameters": "heads",
    "class_cache_update": "average",
    "per_class_threshold": True,
    "real_gradients": "training_batch",
    "topup_images": 2,
    "cache_max_age": 1000,
    "cache_sketch": "input_basis",
    "sketch_rank": 8,
    "basis_images": 8,
    "basis_refresh_steps": 100,
    "cache_memory_mb": 2048.0,
}

"""The scoring stage of ``bsgal rescore``: candidate batches in, the same batches with their
scores out, at one checkpoint's detector state (`trainer.rescore.Rescorer`; no training).

Each actor builds the run's trainer once, on its device (CUDA when the actor holds a GPU),
loads rank 0's state of the checkpoint (``weights_only=True``,
:func:`pipeline.storage.checkpoints.load_trainer_state`), and scores every batch at exactly
those weights. Added columns: ``pre_reason`` (an ``invalid_*`` reason decided here, or ``""``),
``score`` and ``cache_norm`` (float64, NaN when none). The threshold is applied afterwards, in
stream order, by the driver (:mod:`pipeline.run.rescore`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from generators.columns import string_column
from pipeline.config import RunConfig, config_from_dict
from pipeline.storage.checkpoints import load_trainer_state
from pipeline.storage.run_dir import RunDir

STREAM_OFFSET = "stream_offset"


def restored_trainer(cfg: RunConfig, run: RunDir, checkpoint: str, device: str | None = None
                     ) -> Any:
    """The run's trainer (rank 0) with ``checkpoint``'s state loaded; ``device`` overrides
    ``training.device`` (the driver uses ``cpu``)."""
    from pipeline.run.datasets import ensure_builtin_data, open_splits
    from pipeline.run.train_worker import trainer_settings
    from trainer.factory import build_trainer

    ensure_builtin_data(cfg.data)
    train_set, _ = open_splits(cfg.data)
    training = trainer_settings(cfg)
    if device is not None:
        training["device"] = device
    trainer = build_trainer(train_set, None, training=training,
                            selection=dataclasses.asdict(cfg.selection), seed=cfg.seed, rank=0)
    trainer.load_state_dict(load_trainer_state(run, checkpoint, 0))
    return trainer


class RescoreStage:
    """Ray Data stage (and plain callable): scores candidate batches (module docstring).

    Args:
        config: the checkpoint's run config as a dict.
        run_uri: the checkpoint's run folder; checkpoint: ``checkpoints/step-N.pt`` there.
        cache, real_images: see `trainer.rescore.Rescorer`.
    """

    def __init__(self, config: dict[str, Any], run_uri: str, checkpoint: str,
                 cache: str = "real", real_images: int = 8) -> None:
        import torch

        from trainer.rescore import Rescorer

        cfg = config_from_dict(config)
        torch.set_num_threads(max(1, int(cfg.training.num_cpus_per_worker)))
        run = RunDir(run_uri, cfg.output.storage_options)
        self.rescorer = Rescorer(restored_trainer(cfg, run, checkpoint), cache=cache,
                                 real_images=real_images, seed=cfg.seed)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trainer.rescore import CACHE_NORM, PRE_REASON, SCORE

        n = len(batch["sample_id"])
        scored = self.rescorer.score(batch, int(batch[STREAM_OFFSET][0]) if n else 0)
        out = dict(batch)
        out[PRE_REASON] = string_column(s[PRE_REASON] for s in scored)
        out[SCORE] = np.asarray([s[SCORE] for s in scored], dtype=np.float64)
        out[CACHE_NORM] = np.asarray([s[CACHE_NORM] for s in scored], dtype=np.float64)
        return out

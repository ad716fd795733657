"""Every generation/annotation stage inside a real local Ray Data pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

from annotators import BuiltinAnnotator, QualityCheck, SamAnnotator  # noqa: E402
from annotators.tiny import build_tiny_sam  # noqa: E402
from generators import ClassVocabulary, PromptSampler  # noqa: E402
from generators.procedural import ProceduralGenerator  # noqa: E402
from generators.stable_diffusion import StableDiffusionGenerator  # noqa: E402
from generators.tiny import write_tiny_sd_pipeline  # noqa: E402

CONTRACT_COLUMNS = {
    "sample_id", "class_id", "class_name", "prompt", "seed", "generator", "image",
    "truth_failure", "truth_class_id", "status", "error", "mask", "annotator", "mask_score",
    "area_ratio", "num_components", "clip_score",
}


def _stage(ds, cls, batch_size: int, **kwargs):
    # Small CPU shares so that four actor stages fit on a 2-CPU local Ray at once.
    return ds.map_batches(
        cls, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=batch_size, num_cpus=0.25, batch_format="numpy", zero_copy_batch=True,
    )


def test_sampler_generators_annotators_and_checks_run_as_ray_data_stages(
    local_ray, tmp_path: Path
) -> None:
    vocab = ClassVocabulary.builtin(12)
    sampler_kwargs = dict(vocabulary=vocab, run_id="ray-test", seed=3)
    folder = write_tiny_sd_pipeline(tmp_path / "tiny-sd")

    # Model chain: sampler -> tiny Stable Diffusion (offline folder) -> tiny SAM -> checks.
    n = 8
    ds = ray.data.range(n)
    ds = _stage(ds, PromptSampler, 4, **sampler_kwargs)
    ds = _stage(ds, StableDiffusionGenerator, 4, model=str(folder), steps=2, resolution=32,
                offline=True)
    ds = _stage(ds, SamAnnotator, 3, model=build_tiny_sam(img_size=64), images_per_forward=3)
    ds = _stage(ds, QualityCheck, 5)
    rows = ds.take_all()
    assert len(rows) == n
    assert CONTRACT_COLUMNS <= set(rows[0])
    expected = PromptSampler(**sampler_kwargs).sample(n)
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in expected)
    assert all(np.asarray(r["image"]).shape == (32, 32, 3) for r in rows)
    assert all(np.asarray(r["mask"]).shape == (32, 32) for r in rows)
    assert all(r["generator"].startswith("sd:tiny-sd@") for r in rows)
    assert all(r["annotator"].startswith("sam:custom@") for r in rows)
    # Random weights give arbitrary masks; every row must still carry a decision-ready status.
    assert all(r["status"] == "ok" or r["status"].startswith("invalid_") for r in rows)

    # Built-in chain from a driver-side sample: procedural generator -> builtin annotator.
    ds = ray.data.from_items(PromptSampler(**sampler_kwargs).sample(n, start=n))
    ds = _stage(ds, ProceduralGenerator, 4, num_classes=12, image_size=64,
                failure_rates={"noise": 0.2})
    ds = _stage(ds, BuiltinAnnotator, 3)
    batch = ds.take_batch(n, batch_format="numpy")
    assert len(batch["sample_id"]) == n
    assert batch["image"].shape == (n, 64, 64, 3) and batch["mask"].shape == (n, 64, 64)
    assert set(batch["generator"]) == {"procedural@1"} and set(batch["annotator"]) == {"builtin@1"}
    clean = batch["truth_failure"] == "none"
    assert clean.any() and (batch["mask_score"][clean] > 0.5).all()
    assert (batch["status"] == "ok").all()

"""Stable Diffusion generator on a tiny random-weight pipeline loaded offline from a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from generators import ModelNotFoundError, PromptSampler, build_generator
from generators.stable_diffusion import StableDiffusionGenerator
from generators.tiny import write_tiny_sd_pipeline, write_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd")


@pytest.fixture(scope="module")
def offline_generator(tiny_sd: Path) -> StableDiffusionGenerator:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield build_generator(
            "stable_diffusion", model=str(tiny_sd), steps=2, resolution=32, guidance=7.5
        )
    finally:
        mp.undo()


def _rows(n: int) -> dict[str, np.ndarray]:
    return PromptSampler.builtin(12, run_id="sd-test", generator="sd").sample_batch(n)


def test_loads_offline_from_a_folder_with_the_chosen_scheduler(
    offline_generator: StableDiffusionGenerator,
) -> None:
    gen = offline_generator
    assert gen.offline is True
    assert type(gen.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert getattr(gen.pipe, "safety_checker", None) is None
    assert gen.version.startswith("sd:tiny-sd@") and len(gen.version.split("@")[1]) == 8


def test_generates_the_right_shapes_and_columns(offline_generator) -> None:
    rows = _rows(3)
    out = offline_generator(rows)
    assert out["image"].shape == (3, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["image"].std() > 0
    assert list(out["status"]) == ["ok"] * 3 and list(out["error"]) == [""] * 3
    assert list(out["truth_failure"]) == [""] * 3
    assert (out["truth_class_id"] == -1).all()
    assert len(set(out["generator"])) == 1
    np.testing.assert_array_equal(out["sample_id"], rows["sample_id"])


def test_same_seed_same_image_whatever_the_batch(offline_generator) -> None:
    rows = _rows(3)
    first = offline_generator(rows)["image"]
    again = offline_generator(rows)["image"]
    np.testing.assert_array_equal(first, again)
    # Row 1 alone, in a batch of its own, reproduces its image from its seed.
    alone = offline_generator({k: v[1:2] for k, v in rows.items()})["image"][0]
    assert np.abs(alone.astype(int) - first[1].astype(int)).max() <= 1
    # Another seed for the same prompt gives another image.
    other = {k: v[1:2].copy() for k, v in rows.items()}
    other["seed"] = other["seed"] + 1
    assert np.abs(offline_generator(other)["image"][0].astype(int) - alone).mean() > 5


def test_a_failing_row_is_isolated_and_marked(offline_generator, monkeypatch) -> None:
    real = offline_generator.generate

    def flaky(prompts, seeds):
        if any("POISON" in p for p in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(prompts, seeds)

    monkeypatch.setattr(offline_generator, "generate", flaky)
    rows = _rows(3)
    rows["prompt"] = np.array([rows["prompt"][0], "POISON", rows["prompt"][2]], dtype=object)
    out = offline_generator(rows)
    assert list(out["status"]) == ["ok", "invalid_generation_error", "ok"]
    assert "out of memory" in out["error"][1]
    assert out["image"][1].max() == 0 and out["image"][0].std() > 0


def test_version_hash_follows_the_settings(tiny_sd: Path, offline_generator) -> None:
    same = StableDiffusionGenerator(model=str(tiny_sd), steps=2, resolution=32, offline=True)
    other = StableDiffusionGenerator(model=str(tiny_sd), steps=3, resolution=32, offline=True)
    assert same.version == offline_generator.version
    assert other.version != offline_generator.version


def test_missing_model_folder_names_the_path_and_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionGenerator(model=str(missing), steps=1, resolution=32)
    message = str(info.value)
    assert str(missing) in message and "model_index.json" in message
    assert "generation.model" in message


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning")
def test_missing_hub_model_offline_says_how_to_provide_it(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionGenerator(model="bsgal-tests/not-a-model", steps=1, resolution=32)
    message = str(info.value)
    assert "'bsgal-tests/not-a-model'" in message
    assert "hf download bsgal-tests/not-a-model" in message and "HF_HUB_OFFLINE=0" in message


def test_bad_settings_are_clear_errors(tiny_sd: Path) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'dpm'"):
        StableDiffusionGenerator(model=str(tiny_sd), scheduler="dpm")
    with pytest.raises(ValueError, match="multiple of 8"):
        StableDiffusionGenerator(model=str(tiny_sd), resolution=30)


def test_safety_checker_flags_become_invalid_nsfw_rows(offline_generator, monkeypatch) -> None:
    real = offline_generator.generate

    def flagged(prompts, seeds):
        images, _ = real(prompts, seeds)
        return images, [p.startswith("FLAG") for p in prompts]

    monkeypatch.setattr(offline_generator, "generate", flagged)
    rows = _rows(2)
    rows["prompt"] = np.array(["FLAG me", rows["prompt"][1]], dtype=object)
    out = offline_generator(rows)
    assert list(out["status"]) == ["invalid_nsfw", "ok"]
    assert "safety checker" in out["error"][0]


def test_sdxl_folders_load_through_the_auto_pipeline(tmp_path: Path) -> None:
    folder = write_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl")
    gen = StableDiffusionGenerator(model=str(folder), steps=2, resolution=32, offline=True)
    assert type(gen.pipe).__name__ == "StableDiffusionXLPipeline"
    out = gen({"prompt": np.array(["a cat", "a dog"], dtype=object), "seed": np.array([1, 2])})
    assert out["image"].shape == (2, 32, 32, 3) and list(out["status"]) == ["ok", "ok"]
    again = gen({"prompt": np.array(["a dog"], dtype=object), "seed": np.array([2])})
    assert np.abs(again["image"][0].astype(int) - out["image"][1].astype(int)).max() <= 1

"""Built-in procedural generator: looks, determinism, failure modes and their recorded truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from generators import GENERATORS, PromptSampler, build_generator
from generators.procedural import FAILURES, ProceduralGenerator

RATES = {"wrong_class": 0.15, "broken": 0.15, "clutter": 0.15, "noise": 0.15}


@pytest.fixture(scope="module")
def generated() -> dict[str, np.ndarray]:
    rows = PromptSampler.builtin(12, run_id="gen-test", seed=1).sample_batch(160)
    gen = ProceduralGenerator(num_classes=12, failure_rates=RATES, emit_truth_mask=True)
    return gen(rows)


def test_backend_factory_and_output_columns(builtin_data: Path) -> None:
    assert set(GENERATORS.names()) == {"procedural", "stable_diffusion"}
    gen = build_generator("procedural", lvis_json=builtin_data / "train.json", image_size=64)
    rows = PromptSampler.from_lvis_json(builtin_data / "train.json").sample_batch(5)
    out = gen(rows)
    assert out["image"].shape == (5, 64, 64, 3) and out["image"].dtype == np.uint8
    assert list(out["generator"]) == ["procedural@1"] * 5
    assert out["truth_class_id"].dtype == np.int64
    np.testing.assert_array_equal(out["sample_id"], rows["sample_id"])  # passed through
    assert "truth_mask" not in out  # only on request
    with pytest.raises(ValueError, match="'dalle' is not a generator backend"):
        build_generator("dalle")


def test_same_class_and_seed_give_the_same_image() -> None:
    gen = ProceduralGenerator(num_classes=12, failure_rates=RATES)
    a = gen({"class_id": np.array([3, 3, 4]), "seed": np.array([10, 11, 10])})
    b = gen({"class_id": np.array([3]), "seed": np.array([10])})
    np.testing.assert_array_equal(a["image"][0], b["image"][0])
    assert not np.array_equal(a["image"][0], a["image"][1])
    assert not np.array_equal(a["image"][0], a["image"][2])


def test_successful_samples_are_one_centred_object_on_a_white_background(generated) -> None:
    ok = generated["truth_failure"] == "none"
    assert ok.sum() > 40
    masks = generated["truth_mask"][ok]
    coverage = masks.mean(axis=(1, 2))
    assert coverage.min() >= 0.1 and coverage.max() <= 0.6
    images = generated["image"][ok].astype(np.int32)
    background = images[~masks]
    assert background.min() >= 230  # plain near-white
    ys, xs = np.nonzero(masks[0])
    size = masks.shape[1]
    assert abs(ys.mean() - size / 2) < 0.2 * size and abs(xs.mean() - size / 2) < 0.2 * size
    np.testing.assert_array_equal(
        generated["truth_class_id"][ok], generated["class_id"][ok]
    )


def test_failure_modes_occur_at_their_rates_and_are_recorded(generated) -> None:
    failures = generated["truth_failure"]
    n = len(failures)
    for name in FAILURES:
        share = float((failures == name).mean())
        assert share == pytest.approx(RATES[name], abs=0.09), name
    wrong = failures == "wrong_class"
    assert (generated["truth_class_id"][wrong] != generated["class_id"][wrong]).all()
    assert (generated["truth_class_id"][failures == "clutter"] == -1).all()
    assert (generated["status"] == "ok").all() and len(generated["status"]) == n
    noisy = generated["image"][failures == "noise"].astype(np.float32)
    clean = generated["image"][failures == "none"].astype(np.float32)
    # Heavy noise: neighbouring pixels differ a lot more than in clean images.
    rough = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
    assert rough(noisy) > 5 * rough(clean)


def test_zero_failure_rates_never_fail() -> None:
    gen = ProceduralGenerator(num_classes=6, failure_rates={})
    out = gen(PromptSampler.builtin(6).sample_batch(40))
    assert set(out["truth_failure"]) == {"none"}


def test_bad_rows_become_invalid_rows_not_exceptions() -> None:
    gen = ProceduralGenerator(num_classes=4)
    out = gen(
        {
            "class_id": np.array([1, 99, 2]),
            "seed": np.array([1, 2, 3]),
            "status": np.array(["ok", "ok", "invalid_upstream"], dtype=object),
            "error": np.array(["", "", "from before"], dtype=object),
        }
    )
    assert list(out["status"]) == ["ok", "invalid_unknown_class", "invalid_upstream"]
    assert "class_id 99" in out["error"][1] and "built-in classes [1, 2, 3, 4]" in out["error"][1]
    assert out["error"][2] == "from before"
    assert out["image"][1].max() == 0 and out["image"][0].max() > 0


def test_a_real_vocabulary_without_looks_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "apple", "frequency": "f"}]}))
    with pytest.raises(ValueError, match="only knows the built-in classes") as info:
        ProceduralGenerator(lvis_json=path)
    assert "stable_diffusion" in str(info.value) and "apple" in str(info.value)


def test_bad_failure_rates_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown failure 'blurry'"):
        ProceduralGenerator(failure_rates={"blurry": 0.1})
    with pytest.raises(ValueError, match="sum to at most 1"):
        ProceduralGenerator(failure_rates={"broken": 0.6, "noise": 0.6})
    with pytest.raises(KeyError, match="needs the input column"):
        ProceduralGenerator()({"seed": np.array([1])})

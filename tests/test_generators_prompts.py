"""Prompt sampler: vocabulary, templates, weighting, determinism, resumable stream, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from generators import ClassVocabulary, PromptSampler, UnknownClassError, make_sample_id
from generators.prompts import DEFAULT_TEMPLATE

LVIS_CATEGORIES = [
    {"id": 3, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"],
     "def": "a dispenser that holds a substance under pressure", "frequency": "c",
     "image_count": 64},
    {"id": 7, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"],
     "def": "a weapon for shooting arrows", "frequency": "r", "image_count": 2},
    {"id": 11, "name": "apple", "synonyms": ["apple"], "def": "fruit with red or yellow skin",
     "frequency": "f", "image_count": 1000},
]


@pytest.fixture
def lvis_json(tmp_path: Path) -> Path:
    path = tmp_path / "lvis_mini.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": LVIS_CATEGORIES}))
    return path


def test_lvis_vocabulary_and_reference_prompt(lvis_json: Path) -> None:
    sampler = PromptSampler.from_lvis_json(lvis_json, weighting="uniform")
    assert sampler.prompts_of("bow_(weapon)") == [
        "a photo of a single bow (weapon), a weapon for shooting arrows, in a white background"
    ]
    # Synonyms and string ids find the class too.
    assert sampler.prompts_of("spray_can") == sampler.prompts_of(3) == sampler.prompts_of("3")
    assert sampler.vocabulary.get(11).frequency == "f"


def test_builtin_vocabulary_matches_the_builtin_dataset_json(builtin_data: Path) -> None:
    from_file = ClassVocabulary.from_lvis_json(builtin_data / "train.json")
    builtin = ClassVocabulary.builtin(len(from_file))
    for a, b in zip(from_file, builtin):
        assert (a.id, a.name, a.definition, a.look) == (b.id, b.name, b.definition, b.look)
        # The file labels a class by the images it really has: on this small set (240 train
        # images) the planned frequent classes have <= 100 and are labelled common.
        assert a.frequency == b.frequency or (b.frequency, a.frequency) == ("f", "c")
    assert all(c.image_count is not None for c in from_file)


def test_same_seed_and_run_same_stream_and_start_continues_it(lvis_json: Path) -> None:
    a = PromptSampler.from_lvis_json(lvis_json, run_id="r1", seed=5)
    b = PromptSampler.from_lvis_json(lvis_json, run_id="r1", seed=5)
    whole = a.sample_batch(40)
    for key, col in whole.items():
        np.testing.assert_array_equal(col, b.sample_batch(40)[key])
    # A resumed run that starts at position 25 sees exactly the tail of the stream.
    tail = b.sample_batch(15, start=25)
    for key in whole:
        np.testing.assert_array_equal(whole[key][25:], tail[key])
    other_run = PromptSampler.from_lvis_json(lvis_json, run_id="r2", seed=5).sample_batch(40)
    other_seed = PromptSampler.from_lvis_json(lvis_json, run_id="r1", seed=6).sample_batch(40)
    assert not np.array_equal(whole["seed"], other_run["seed"])
    assert not np.array_equal(whole["seed"], other_seed["seed"])
    assert len(set(whole["sample_id"])) == 40


def test_rows_have_the_contract_columns_and_ids_hash_their_fields(lvis_json: Path) -> None:
    sampler = PromptSampler.from_lvis_json(lvis_json, run_id="run-x", generator="procedural")
    batch = sampler.sample_batch(6, start=3)
    assert set(batch) == {"sample_id", "class_id", "class_name", "prompt", "prompt_option",
                          "seed"}
    assert (batch["prompt_option"] == 0).all()  # one template
    assert batch["class_id"].dtype == np.int64 and batch["seed"].dtype == np.int64
    assert ((batch["seed"] >= 0) & (batch["seed"] < 2**53)).all()
    rows = sampler.sample(6, start=3)
    for i, row in enumerate(rows):
        assert row["sample_id"] == make_sample_id(
            "run-x", row["class_id"], row["prompt"], row["seed"], "procedural"
        ) == batch["sample_id"][i]
    # The generator name is part of the id.
    assert make_sample_id("run-x", 3, "p", 1, "sd") != make_sample_id("run-x", 3, "p", 1, "")
    # As a Ray-style stage over ray.data.range(n): the 'id' column holds stream positions.
    staged = sampler({"id": np.array([3, 4, 5, 6, 7, 8])})
    np.testing.assert_array_equal(staged["sample_id"], batch["sample_id"])


def _class_counts(sampler: PromptSampler, n: int) -> dict[int, int]:
    ids, counts = np.unique(sampler.sample_batch(n)["class_id"], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def test_weighting_schemes_shape_the_class_frequencies(lvis_json: Path) -> None:
    n = 6000
    uniform = _class_counts(PromptSampler.from_lvis_json(lvis_json, weighting="uniform"), n)
    assert all(abs(c / n - 1 / 3) < 0.03 for c in uniform.values())
    boost = PromptSampler.from_lvis_json(lvis_json, weighting="rare_boost")
    assert boost.probabilities == pytest.approx({3: 2 / 7, 7: 4 / 7, 11: 1 / 7})
    counts = _class_counts(boost, n)
    assert counts[7] / n == pytest.approx(4 / 7, abs=0.03)
    inverse = PromptSampler.from_lvis_json(lvis_json, weighting="inverse_frequency")
    total = 1 / 64 + 1 / 2 + 1 / 1000
    assert inverse.probabilities[7] == pytest.approx(0.5 / total)
    external = PromptSampler.from_lvis_json(
        lvis_json, weighting="external", external_weights={"apple": 1.0, "3": 3.0}
    )
    assert external.probabilities == pytest.approx({3: 0.75, 7: 0.0, 11: 0.25})
    assert 7 not in _class_counts(external, 500)


def test_groups_and_classes_restrict_and_set_weights_changes_later_positions(
    lvis_json: Path,
) -> None:
    rare_only = PromptSampler.from_lvis_json(lvis_json, groups=["r"])
    assert set(_class_counts(rare_only, 200)) == {7}
    sampler = PromptSampler.from_lvis_json(lvis_json, weighting="uniform", run_id="fb")
    before = sampler.sample_batch(50)
    sampler.set_weights({"apple": 1.0})  # trainer feedback: only apples from now on
    assert set(sampler.sample_batch(100, start=50)["class_id"]) == {11}
    sampler.set_weights([1.0, 1.0, 1.0])
    np.testing.assert_array_equal(sampler.sample_batch(50)["class_id"], before["class_id"])
    with pytest.raises(ValueError, match="finite and >= 0"):
        sampler.set_weights({"apple": -1.0})
    with pytest.raises(ValueError, match="weight 0"):
        sampler.set_weights({"apple": 0.0})
    with pytest.raises(ValueError, match="expected 3 weights"):
        sampler.set_weights([1.0, 2.0])


def test_unknown_class_names_the_class_and_lists_valid_ones(lvis_json: Path) -> None:
    with pytest.raises(UnknownClassError) as info:
        PromptSampler.from_lvis_json(lvis_json, classes=["aple"])
    message = str(info.value)
    assert "'aple'" in message and "did you mean 'apple'" in message
    assert "3:aerosol_can" in message and "7:bow_(weapon)" in message
    with pytest.raises(UnknownClassError, match="unknown class 'banana'"):
        PromptSampler.from_lvis_json(
            lvis_json, weighting="external", external_weights={"banana": 1.0}
        )
    sampler = PromptSampler.from_lvis_json(lvis_json)
    with pytest.raises(UnknownClassError, match="unknown class 99"):
        sampler.set_weights({99: 1.0})


def test_extra_prompts_file_joins_the_template_prompts(lvis_json: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"apple": ["a red apple on a table", "an apple, studio light"]}))
    sampler = PromptSampler.from_lvis_json(
        lvis_json, extra_prompts=extra, classes=["apple"], templates=["a photo of a {name}"]
    )
    assert sampler.prompts_of("apple") == [
        "a photo of a apple", "a red apple on a table", "an apple, studio light"
    ]
    used = set(sampler.sample_batch(300)["prompt"])
    assert used == set(sampler.prompts_of("apple"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not valid JSON"),
        ('["apple"]', "top level must be a JSON object"),
        ('{"apple": [1, 2]}', "must be a list of non-empty strings"),
        ('{"apple": [""]}', "must be a list of non-empty strings"),
        ('{"pear": ["a pear"]}', "unknown class 'pear'"),
    ],
)
def test_malformed_extra_prompts_file_is_a_clear_error(
    lvis_json: Path, tmp_path: Path, content: str, match: str
) -> None:
    extra = tmp_path / "extra.json"
    extra.write_text(content)
    with pytest.raises((ValueError, KeyError), match=match) as info:
        PromptSampler.from_lvis_json(lvis_json, extra_prompts=extra)
    assert "pear" in str(info.value) or str(extra) in str(info.value)


def test_bad_templates_weights_and_files_are_clear_errors(lvis_json: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \{color\}"):
        PromptSampler.from_lvis_json(lvis_json, templates=["a {color} {name}"])
    with pytest.raises(ValueError, match="group_weights"):
        PromptSampler.from_lvis_json(lvis_json, group_weights={"r": 1.0, "f": 1.0})
    with pytest.raises(ValueError, match="needs external weights"):
        PromptSampler.from_lvis_json(lvis_json, weighting="external")
    with pytest.raises(ValueError, match="unknown class weighting 'rare'"):
        PromptSampler.from_lvis_json(lvis_json, weighting="rare")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        PromptSampler.from_lvis_json(tmp_path / "nope.json")
    no_counts = ClassVocabulary.from_categories([{"id": 1, "name": "x", "frequency": "r"}])
    with pytest.raises(ValueError, match="needs 'image_count'"):
        PromptSampler(no_counts, weighting="inverse_frequency")


def test_empty_definition_leaves_no_dangling_comma() -> None:
    vocab = ClassVocabulary.from_categories([{"id": 1, "name": "teapot", "frequency": "f"}])
    sampler = PromptSampler(vocab, templates=DEFAULT_TEMPLATE)
    assert sampler.prompts_of(1) == ["a photo of a single teapot, in a white background"]

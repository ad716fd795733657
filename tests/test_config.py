"""Config: YAML round trip, section.key=value overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import re
import pytest

from pipeline.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from tests.conftest import CONFIGS


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["selection.threshold=dynamic", "training.steps=7",
                             "generation.group_weights={r: 9, c: 1, f: 0.5}"])
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert again.selection.threshold == "dynamic"
    assert again.training.steps == 7
    assert again.generation.group_weights == {"r": 9, "c": 1, "f": 0.5}


@pytest.mark.parametrize("name", ["demo.yaml", "lvis_sd_sam.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_differ_where_they_should() -> None:
    demo = load_config(CONFIGS / "demo.yaml")
    real = load_config(CONFIGS / "lvis_sd_sam.yaml")
    assert (demo.generation.backend, demo.annotation.backend) == ("procedural", "builtin")
    assert (real.generation.backend, real.annotation.backend) == ("stable_diffusion", "sam")
    assert real.training.arch == "resnet50_fpn" and real.training.use_gpu
    # Both run what the selection benchmark measured best (the instance-level composite); the
    # LVIS one with the class caches that fit 1203 classes.
    for cfg in (demo, real):
        assert (cfg.selection.granularity, cfg.selection.method) == ("instance", "composite")
    assert real.selection.cache_sketch == "input_basis"
    assert real.selection.real_gradients == "training_batch"
    assert demo.selection.quality_gates == {"mask_score": 0.8}


def test_override_wins_over_file_and_widens_int_to_float() -> None:
    cfg = load_config(CONFIGS / "demo.yaml", ["training.lr=1", "name=other"])
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert cfg.name == "other"


def test_optional_field_accepts_null_and_value() -> None:
    assert load_config(None, ["ray.address=null"]).ray.address is None
    assert load_config(None, ["ray.address=auto"]).ray.address == "auto"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("selection.thresold=fixed", "unknown key 'selection.thresold'; did you mean "
                                     "'selection.threshold'?"),
        ("selectoin.threshold=fixed", "did you mean 'selection'?"),
        ("training.steps=ten", "training.steps: 'ten' (str) is not int"),
        ("training.steps=1.5", "training.steps"),
        ("selection.threshold=dynamc", "did you mean 'dynamic'?"),
        ("training.amp=maybe", "training.amp"),
        ("selection.momentum=1.5", "selection.momentum: must be within [0, 1]"),
        ("training.steps=0", "training.steps: must be > 0"),
        ("generation.failure_rates={broke: 0.1}", "did you mean 'broken'?"),
        ("training=3", "training: expected a mapping"),
        ("annotation.backend=sam", "annotation.sam_checkpoint: required"),
        ("training.max_failures=-1", "training.max_failures: must be >= 0"),
        ("ray.placement_timeout_s=0", "ray.placement_timeout_s: must be > 0"),
        # A read-ahead bound below the stages' batches together stalls the stream.
        (["feedback.max_ahead=48", "annotation.batch_size=64", "feedback.policy=yield_aware"],
         "feedback.max_ahead: 48 candidates ahead"),
    ],
)
def test_bad_values_name_the_key(override: str | list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override] if isinstance(override, str) else override)
    assert fragment in str(info.value)


@pytest.mark.parametrize("override", ["no_equals_sign", "=3", "a..b=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'training.stpes'; did you "
                                          r"mean 'training.steps'\?"):
        load_config(typo)


def test_schema_version_mismatch_is_explained() -> None:
    with pytest.raises(ConfigError, match="schema_version: 99"):
        load_config(None, ["schema_version=99"])


@pytest.mark.parametrize("override, said", [
    ("generation.image_size=-5", "generation.image_size: must be >= 16, got -5"),
    ("generation.pool_fill=1.5", "generation.pool_fill: must be > 0 and <= 1, got 1.5"),
    ("generation.resolution=500", "multiple of 8"),
    ("feedback.half_life=0", "feedback.half_life: must be > 0"),
    ("training.momentum=1.5", "training.momentum: must be >= 0 and <= 1"),
    ("selection.sketch_rank=0", "selection.sketch_rank: must be >= 1"),
])
def test_every_numeric_key_is_checked_when_the_config_loads(override: str, said: str) -> None:
    from pipeline.config.validation import RANGES

    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(CONFIGS / "demo.yaml", [override])
    for key in RANGES:  # every listed key exists (a renamed key would silently go unchecked)
        section, name = key.split(".")
        assert hasattr(getattr(load_config(CONFIGS / "demo.yaml"), section), name), key

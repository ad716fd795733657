"""A contributor's view of the registries: a toy selection method (with its own signal), a toy
generator backend (with its own option), a toy quality check and a toy pool format, each
registered from this module alone, go through config validation and one step of the real code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotators import ANNOTATORS
from annotators.checks import MaskCheck, register_check, unregister_check
from annotators.quality import build_quality_check
from benchmarks._candidate_stream import real_cutouts
from generators import GENERATORS, ClassVocabulary, PromptSampler
from generators.columns import GENERATOR, IMAGE, STATUS, STATUS_OK, string_column
from pipeline.config import ConfigError, load_config
from pipeline.run.graph import stage_specs
from pipeline.run.pool_source import pool_draws
from pipeline.run.pool_stage import PoolReader
from pipeline.storage.pool_index import (
    PoolFormat,
    PoolRequest,
    pool_index_of,
    register_pool_format,
    unregister_pool_format,
)
from pipeline.storage.shard_schema import shard_schema
from selector.methods import SelectionMethod, register_method, unregister_method
from tests.conftest import DEMO_CONFIG
from trainer.factory import build_trainer
from trainer.instance_signals import (
    CandidateScore,
    ScoreSignal,
    register_signal,
    unregister_signal,
)

TRAIN_IMAGES = 64


# ------------------------------------------------------------------------- the four toys


class MaskScoreSignal(ScoreSignal):
    """Scores a candidate by its own mask score: no gradient, no cache."""

    name = "toy_mask_score"

    def score(self, step: Any, inputs: Any, passing: Any, refresh: Any) -> dict:
        return {c.position: CandidateScore("", float(c.fields["mask_score"])) for c in passing}


class FlatColourGenerator:
    """Draws a square of one colour (``options.colour``) on white, for every prompt row."""

    def __init__(self, colour: list[int], size: int) -> None:
        self.colour, self.size = np.asarray(colour, np.uint8), size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["sample_id"])
        image = np.full((n, self.size, self.size, 3), 255, np.uint8)
        q = self.size // 4
        image[:, q:3 * q, q:3 * q] = self.colour
        return {**batch, IMAGE: image, GENERATOR: string_column(["toy@1"] * n),
                STATUS: string_column([STATUS_OK] * n), "error": string_column([""] * n)}


class ToyGeneratorBackend:
    """A generator backend outside the built-in set: its option lives in generation.options."""

    STAGE = FlatColourGenerator
    OPTIONS = ("colour",)

    @staticmethod
    def build(section: dict, *, categories: Any = ()) -> FlatColourGenerator:
        return FlatColourGenerator(section["options"].get("colour", [200, 30, 30]),
                                   section["image_size"])

    @staticmethod
    def check_section(section: dict) -> list[str]:
        colour = section["options"].get("colour", [200, 30, 30])
        if len(colour) != 3 or not all(0 <= int(c) <= 255 for c in colour):
            return [f"generation.options.colour: three values in 0..255, got {colour!r}"]
        return []


def _pixels(mask: np.ndarray, settings: dict) -> tuple[dict[str, float], str | None]:
    pixels = float(mask.sum())
    if pixels >= settings["toy_min_pixels"]:
        return {"toy_pixels": pixels}, None
    return {"toy_pixels": pixels}, f"{pixels:.0f} px, fewer than {settings['toy_min_pixels']}"


def _read_csv_pool(request: PoolRequest) -> Any:
    """``class_id,path`` lines of RGBA cut-outs (paths relative to the file)."""
    base = Path(request.uri).parent
    by_class: dict[int, list[tuple[str, str, float]]] = {}
    for line in Path(request.uri).read_text().splitlines():
        cid, path = line.split(",")
        by_class.setdefault(int(cid), []).append((f"*{base / path}", path, 0.9))
    return pool_index_of(request.uri, "toy_csv", by_class, {})


@pytest.fixture
def toys():
    register_method(SelectionMethod("toy_gated_mask_score", "instance", gated=True,
                                    signal="toy_mask_score"))
    register_signal(MaskScoreSignal())
    GENERATORS.register("toy", ToyGeneratorBackend)
    register_check(MaskCheck("toy_pixels", "invalid_toy_small", _pixels,
                             settings={"toy_min_pixels": 10}, fields={"toy_pixels": "float32"}))
    register_pool_format(PoolFormat("toy_csv", _read_csv_pool, layout="class_id,path lines"))
    try:
        yield
    finally:
        unregister_method("instance", "toy_gated_mask_score")
        unregister_signal("toy_mask_score")
        GENERATORS.unregister("toy")
        unregister_check("toy_pixels")
        unregister_pool_format("toy_csv")


# ----------------------------------------------------------------------------- the tests


def test_toys_pass_config_validation_and_bad_toy_settings_are_named(toys, tmp_path) -> None:
    keys = [f"output.dir={tmp_path / 'out'}", "generation.backend=toy",
            "generation.options={colour: [10, 200, 10]}", "selection.granularity=instance",
            "selection.method=toy_gated_mask_score", "annotation.options={toy_min_pixels: 5}"]
    cfg = load_config(DEMO_CONFIG, keys)
    assert cfg.generation.backend == "toy" and cfg.selection.method == "toy_gated_mask_score"
    with pytest.raises(ConfigError, match=r"generation.options.colour: three values"):
        load_config(DEMO_CONFIG, [*keys, "generation.options={colour: [1, 2]}"])
    with pytest.raises(ConfigError, match=r"options.color: .*did you mean 'colour'"):
        load_config(DEMO_CONFIG, [*keys, "generation.options={color: [1, 2, 3]}"])
    with pytest.raises(ConfigError, match=r"'tyo' is not a generator backend.*did you mean 'toy'"):
        load_config(DEMO_CONFIG, [*keys, "generation.backend=tyo"])
    with pytest.raises(ConfigError, match="toy_gated_mask_score.*is an instance-level method"):
        load_config(DEMO_CONFIG, [*keys, "selection.granularity=batch"])
    cfg = load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'pool'}", "generation.backend=pool",
                                    "generation.pool=p.csv", "generation.pool_format=toy_csv"])
    assert cfg.generation.pool_format == "toy_csv"
    with pytest.raises(ConfigError, match=r"'toy_cvs' is not auto or one of .*'toy_csv'"):
        load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'pool'}", "generation.backend=pool",
                                  "generation.pool=p.csv", "generation.pool_format=toy_cvs"])
    # The check's field is a column of the shard schema built now.
    assert shard_schema().field("toy_pixels").type == "float"


def test_toy_generator_check_and_method_make_one_training_step(toys, train_set, tmp_path
                                                                ) -> None:
    cats = train_set.category_dicts() if hasattr(train_set, "category_dicts") else [
        {"id": c.id, "name": c.name, "frequency": c.frequency} for c in train_set.categories]
    cfg = load_config(DEMO_CONFIG, [
        f"output.dir={tmp_path / 'out'}", "generation.backend=toy", "generation.image_size=64",
        "generation.options={colour: [10, 200, 10]}", "selection.granularity=instance",
        "selection.method=toy_gated_mask_score", "selection.keep_fraction=0.5",
        "selection.quality_gates={mask_score: 0.0}", "annotation.options={toy_min_pixels: 5}"])
    specs = stage_specs(cfg, cats)
    assert [s.name for s in specs] == ["generate", "annotate", "check"]
    batch = PromptSampler(ClassVocabulary.from_categories(cats), seed=0).sample_batch(12)
    for spec in specs:  # each stage as a Ray actor would build and call it
        batch = spec.build(**spec.kwargs)(batch)
    assert (batch["image"][:, 32, 32] == [10, 200, 10]).all()
    assert (batch["status"] == STATUS_OK).all() and (batch["toy_pixels"] == 32 * 32).all()
    # The same check with a higher minimum rejects every mask with its own reason and field.
    strict = build_quality_check({**_asdict(cfg.annotation), "options": {"toy_min_pixels": 5000}})
    refused = strict({k: batch[k] for k in ("sample_id", "image", "mask", "class_name")})
    assert set(refused["status"]) == {"invalid_toy_small"}
    assert (refused["toy_pixels"] == 32 * 32).all()
    # The check's field reaches the decision shards (a writer started after registering it).
    from pipeline.run.rows import decision_row
    from pipeline.storage.shard_writer import ShardWriter
    from pipeline.storage.shards import read_decisions
    from trainer.candidates import decision_record

    with ShardWriter(str(tmp_path / "run"), max_rows=100) as writer:
        writer.add([decision_row({k: v[i] for k, v in batch.items()}, decision_record(
            str(batch["sample_id"][i]), reason="accepted", accepted=True, step=0, rank=0,
            method="toy", stream_offset=i), run_id="toy", frequency={}, devices={
                s: ("CPU", 1.0) for s in ("generate", "annotate", "check", "score", "train")},
            units="") for i in range(len(batch["sample_id"]))])
    table = read_decisions(str(tmp_path / "run"), columns=["toy_pixels", "area_ratio"])
    assert table.num_rows == 12 and set(table["toy_pixels"].to_pylist()) == {32.0 * 32}
    # One trainer step judges the toy candidates with the toy method: scored by mask score.
    trainer = build_trainer(train_set, training={"steps": 4, "batch_size": 2},
                            selection=_asdict(cfg.selection), seed=0)
    rows = real_cutouts(train_set, 8, seed=1, mask_scores=True)
    result = trainer.train_on_candidates(rows)
    reasons = Counter(d["reason"] for d in result.decisions)
    assert reasons["accepted"] > 0 and reasons["rejected_score"] > 0
    by_id = {r["sample_id"]: r for r in rows}
    for d in result.decisions:
        if d["reason"] in ("accepted", "rejected_score"):
            assert d["score"] == pytest.approx(float(by_id[d["sample_id"]]["mask_score"]))


def test_toy_pool_format_is_read_drawn_and_opened(toys, train_set, tmp_path) -> None:
    rows = real_cutouts(train_set, 4, seed=2)
    lines = []
    for n, row in enumerate(rows):
        rgba = np.dstack([row["image"], row["mask"].astype(np.uint8) * 255])
        Image.fromarray(rgba).save(tmp_path / f"{n}.png")
        lines.append(f"{row['class_id']},{n}.png")
    (tmp_path / "pool.csv").write_text("\n".join(lines))
    cfg = load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'out'}", "generation.backend=pool",
                                    f"generation.pool={tmp_path / 'pool.csv'}",
                                    "generation.pool_format=toy_csv"])
    cats = [{"id": c.id, "name": c.name} for c in train_set.categories]
    assert [s.name for s in stage_specs(cfg, cats)] == ["generate", "check"]
    draws = pool_draws(cfg, cats)
    assert draws.index.format == "toy_csv" and len(draws.index) == 4
    out = PoolReader(image_size=64)(draws.sample_batch(6))
    assert (out["status"] == STATUS_OK).all(), out["error"]
    assert all(out["mask"][i].any() for i in range(6))
    assert set(out["source_id"]) <= {f"{n}.png" for n in range(4)}


def _asdict(section: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(section)


def test_the_registries_know_the_built_in_names() -> None:
    from pipeline.storage.pool_index import pool_format_names
    from selector.methods import method_names

    assert set(GENERATORS.names()) == {"procedural", "stable_diffusion"}
    assert set(ANNOTATORS.names()) == {"builtin", "sam"}
    assert pool_format_names() == ("bsgal", "xpaste", "shards", "images")
    assert method_names("instance") == ("composite", "bsgal", "quality_gate", "loss",
                                        "gated_loss", "accept_all", "random", "none")

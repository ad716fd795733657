"""The trainer fed with what the built-in generator and annotator produce
(docs/contracts.md batches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from annotators.builtin import BuiltinAnnotator
from annotators.quality import QualityCheck
from generators.procedural import ProceduralGenerator
from trainer.datasets import LvisDataset
from trainer.factory import build_trainer


def test_generated_and_annotated_batches_get_one_decision_per_row(builtin_data: Path) -> None:
    train = LvisDataset(builtin_data, "train.json", max_images=48)
    generator = ProceduralGenerator(lvis_json=str(builtin_data / "train.json"), image_size=96,
                                    failure_rates={"clutter": 0.3, "noise": 0.3})
    annotate, check = BuiltinAnnotator(), QualityCheck(min_area_ratio=0.05, max_area_ratio=0.95)
    class_ids = np.array([c.id for c in train.categories] * 2, dtype=np.int64)
    prompts = {"class_id": class_ids, "seed": np.arange(len(class_ids), dtype=np.int64),
               "sample_id": np.array([f"g{i}" for i in range(len(class_ids))], dtype=object)}
    batch = check(annotate(generator(prompts)))
    batch["status"][0] = "invalid_generation_error"  # an upstream failure still gets its row
    trainer = build_trainer(train, training={"batch_size": 2, "device": "cpu"},
                            selection={"method": "bsgal", "real_batch_size": 2})
    result = trainer.train_on_candidates(batch)
    decisions = result.decisions
    assert [d["sample_id"] for d in decisions] == list(prompts["sample_id"])
    assert decisions[0]["reason"] == "invalid_generation_error"
    for d, status in zip(decisions, batch["status"]):
        if status != "ok":
            assert d["reason"] == status and d["batch_id"] == ""
        else:
            assert d["batch_id"].startswith("rank0-step")
    assert sum(s["num_candidates"] for s in result.steps) == int((batch["status"] == "ok").sum())

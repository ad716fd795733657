"""`bsgal run` over an X-Paste-layout pool on a real local Ray: the pool's entries stream
through the reader and the checks into the same trainer, and every draw leaves one shard row
that names the pool and the entry it came from (corrupt entries included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

from benchmarks._candidate_stream import real_cutouts  # noqa: E402
from benchmarks._pool_files import write_xpaste_pool  # noqa: E402
from pipeline.storage.shards import read_decisions  # noqa: E402
from tests.conftest import invoke_cli  # noqa: E402

CANDIDATES = 48


def test_run_over_an_xpaste_pool(local_ray, builtin_data: Path, tmp_path: Path) -> None:
    from trainer.datasets import LvisDataset

    train = LvisDataset(str(builtin_data), "train.json")
    pool = write_xpaste_pool(tmp_path / "pool", real_cutouts(train, 60, seed=1))
    doc = json.loads(pool.read_text())
    doc["0"].append(f"*{tmp_path}/pool/images/0/gone.png")  # a file that is not there
    doc["99"] = [next(iter(doc.values()))[0]]               # LVIS id 100: no such class
    pool.write_text(json.dumps(doc))
    out = tmp_path / "out"
    keys = {
        "data.root": str(builtin_data), "data.max_val_images": 6,
        "generation.backend": "pool", "generation.pool": str(pool),
        "generation.pool_unknown_classes": "rows",  # the "99" key: drawn as invalid rows
        "selection.quality_gates": "{}",
        "generation.num_candidates": CANDIDATES, "generation.batch_size": 16,
        "annotation.check_batch_size": 8,
        "training.steps": 8, "training.warmup_real_steps": 2, "training.warmup_steps": 2,
        "training.checkpoint_every": 4, "training.candidate_batch_size": 8,
        "output.dir": str(out), "output.shard_max_rows": 8, "output.shard_flush_seconds": 1,
    }
    code, text = invoke_cli("run", "--config", "configs/demo.yaml", "--progress", "lines",
                            *(f"{k}={v}" for k, v in keys.items()))
    assert code == 0, text
    table = read_decisions(str(out)).to_pylist()
    assert len(table) == CANDIDATES and len({r["sample_id"] for r in table}) == CANDIDATES
    entries = {e for v in doc.values() for e in v}
    assert all(r["source"] == str(pool) and r["source_id"] in entries for r in table)
    assert {r["generator"] for r in table} == {"pool:xpaste@1"}
    reasons = {r["reason"] for r in table}
    assert "accepted" in reasons
    # Draws of the key "99" class and of the missing file are invalid rows with their cause.
    unknown = [r for r in table if r["class_id"] == 100]
    assert unknown and all(r["reason"] == "invalid_unknown_class" and str(pool) in r["error"]
                           for r in unknown)
    gone = [r for r in table if r["source_id"].endswith("gone.png")]
    assert all(r["reason"] == "invalid_pool_missing" and "no such file" in r["error"]
               for r in gone)
    scored = [r for r in table if r["decision"] != "invalid"]
    assert scored and all(r["annotator"] == "pool-mask@1" and r["image_png"] for r in scored)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts_add_up"] and summary["decisions"]["rows"] == CANDIDATES
    code, text = invoke_cli("inspect", str(out), "--where", f"source = '{pool}'")
    assert code == 0 and "invalid_unknown_class" in text, text

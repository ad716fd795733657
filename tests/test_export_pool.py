"""bsgal export-pool: RGBA cut-outs whose alpha is the stored mask, indexed by class."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inspection.export_pool import class_folder, rgba_cutout
from pipeline.storage.shards import decode_rle, read_decisions
from tests.conftest import invoke_cli, make_rows, write_run


def _check_cutout(png: bytes, row: dict) -> tuple[int, int, int, int]:
    """The PNG is RGBA, cropped to the mask's box, alpha = mask * 255, RGB = the image."""
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGBA"
    rgba = np.asarray(image)
    mask = row["mask"]
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    assert rgba.shape == (y1 - y0, x1 - x0, 4)
    np.testing.assert_array_equal(rgba[..., 3], mask[y0:y1, x0:x1].astype(np.uint8) * 255)
    np.testing.assert_array_equal(rgba[..., :3], row["image"][y0:y1, x0:x1])
    return int(x0), int(y0), int(x1), int(y1)


def test_round_trip_alpha_equals_stored_mask(run_dir, tmp_path: Path) -> None:
    run, rows = run_dir
    pool = tmp_path / "pool"
    code, text = invoke_cli("export-pool", str(run), str(pool))
    assert code == 0, text
    accepted = [r for r in rows if r["accepted"]]
    assert text.startswith(f"exported {len(accepted)} instances of 3 classes to {pool}")
    index = json.loads((pool / "pool.json").read_text())
    assert sorted(index) == ["1", "2", "3"]
    assert sum(len(v) for v in index.values()) == len(accepted)
    stored = {r["sample_id"]: r for r in read_decisions(str(run)).to_pylist()}
    by_id = {r["sample_id"]: r for r in accepted}
    for cid, entries in index.items():
        for e in entries:
            row = by_id[e["sample_id"]]
            assert int(cid) == row["class_id"] and e["class_name"] == row["class_name"]
            assert e["file"] == f"{row['class_name']}/{row['sample_id']}.png"
            png = (pool / e["file"]).read_bytes()
            box = _check_cutout(png, row)
            assert e["box"] == list(box)
            assert (e["width"], e["height"]) == (box[2] - box[0], box[3] - box[1])
            assert e["score"] == pytest.approx(row["score"])
            # Also against the mask as the shard stores it (RLE), not only the test's copy.
            np.testing.assert_array_equal(decode_rle(stored[e["sample_id"]]["mask_rle"]),
                                          row["mask"])
    files = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.png"))
    assert files == sorted(e["file"] for v in index.values() for e in v)
    # X-Paste's InstPool index: 0-based category index → "*" + path of a ready RGBA cut-out.
    xpaste = json.loads((pool / "xpaste_pool.json").read_text())
    assert sorted(xpaste) == ["0", "1", "2"]
    for paths in xpaste.values():
        for p in paths:
            assert p.startswith("*") and Image.open(p[1:]).mode == "RGBA"
    record = json.loads((pool / "export.json").read_text())
    assert record["source"] == str(run) and record["instances"] == len(accepted)
    assert record["skipped"] == []


def test_filters_and_overwrite(run_dir, tmp_path: Path) -> None:
    run, rows = run_dir
    pool = tmp_path / "pool"
    code, _ = invoke_cli("export-pool", str(run), str(pool), "--class", "dog", "--where",
                         "step >= 2")
    assert code == 0
    index = json.loads((pool / "pool.json").read_text())
    want = sorted(r["sample_id"] for r in rows
                  if r["accepted"] and r["class_name"] == "dog" and r["step"] >= 2)
    assert list(index) == ["2"] and sorted(e["sample_id"] for e in index["2"]) == want
    (pool / "notes.txt").write_text("mine")
    code, text = invoke_cli("export-pool", str(run), str(pool))
    assert code == 1 and "already holds an instance pool" in text
    assert len(text.strip().splitlines()) == 1
    code, text = invoke_cli("export-pool", str(run), str(pool), "--overwrite", "--class", "cat")
    assert code == 0, text
    index = json.loads((pool / "pool.json").read_text())
    assert list(index) == ["1"]
    assert not (pool / "dog").exists()  # the old export's files are gone ...
    assert (pool / "notes.txt").read_text() == "mine"  # ... other files are not


def test_unusable_accepted_rows_are_listed_not_dropped(tmp_path: Path) -> None:
    rows = make_rows([(5, "bow_(weapon)", "r", [("accepted", "none")] * 3)])
    rows[1]["mask"] = np.zeros_like(rows[1]["mask"])  # accepted with an empty mask
    write_run(str(tmp_path / "run"), rows)
    code, text = invoke_cli("export-pool", str(tmp_path / "run"), str(tmp_path / "pool"))
    assert code == 0
    assert "2 instances of 1 classes" in text and "1 accepted rows skipped" in text
    record = json.loads((tmp_path / "pool" / "export.json").read_text())
    assert [r["sample_id"] for r in record["skipped"]] == [rows[1]["sample_id"]]
    assert record["skipped"][0]["why"].startswith("ValueError: mask is empty")
    assert (tmp_path / "pool" / "bow_(weapon)").is_dir()


def test_cutout_and_folder_names() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = mask[3, 4] = True
    rgba, box = rgba_cutout(image, mask)
    assert box == (2, 1, 5, 4) and rgba.shape == (3, 3, 4)
    assert rgba[..., 3].tolist() == [[255, 0, 0], [0, 0, 0], [0, 0, 255]]
    with pytest.raises(ValueError, match="differ in size"):
        rgba_cutout(image, mask[:4])
    assert class_folder("bow_(weapon)", 1) == "bow_(weapon)"
    assert class_folder("../etc/passwd", 7) == "etc_passwd"
    assert class_folder("", 7) == "class_7"


def test_no_shards_is_one_line(tmp_path: Path) -> None:
    code, text = invoke_cli("export-pool", str(tmp_path), str(tmp_path / "pool"))
    assert code == 1 and "no decision shards found" in text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "pool").exists()


@pytest.mark.s3
def test_export_from_and_to_s3(s3_server) -> None:
    import s3fs

    bucket = s3_server.make_bucket("export-test")
    rows = make_rows()
    write_run(f"{bucket}/run", rows, s3_server.storage_options)
    code, text = invoke_cli("export-pool", f"{bucket}/run", f"{bucket}/pool", "--endpoint-url",
                            s3_server.endpoint_url, "--class", "yak")
    assert code == 0, text
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    index = json.loads(fs.cat(f"{bucket}/pool/pool.json"))
    (entry,) = index["3"]  # yak has one accepted instance
    row = next(r for r in rows if r["sample_id"] == entry["sample_id"])
    _check_cutout(fs.cat(f"{bucket}/pool/{entry['file']}"), row)

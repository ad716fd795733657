"""bsgal export-pool: RGBA cut-outs whose alpha is the stored mask, indexed by class."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inspection.export_pool import class_folder, rgba_cutout
from pipeline.storage.shard_schema import decode_rle
from pipeline.storage.shards import read_decisions
from tests.conftest import HOSTILE_PLAN, invoke_cli, make_rows, write_run


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


def test_untrusted_names_cannot_write_outside_the_pool(tmp_path: Path) -> None:
    rows = make_rows(HOSTILE_PLAN)
    rows[0]["sample_id"], rows[4]["sample_id"] = "x/y", "x_y"  # one class, one file name
    write_run(str(tmp_path / "run"), rows)
    pool, outside = tmp_path / "pool", tmp_path / "outside"
    outside.mkdir()
    pool.mkdir()
    (pool / "evil").symlink_to(outside, target_is_directory=True)  # "../../evil" → "evil"
    code, text = invoke_cli("export-pool", str(tmp_path / "run"), str(pool))
    assert code == 0, text
    accepted = [r for r in rows if r["accepted"]]
    assert text.startswith(f"exported {len(accepted)} instances of 4 classes")
    assert list(outside.iterdir()) == []  # nothing went through the link
    index = json.loads((pool / "pool.json").read_text())
    files = [e["file"] for entries in index.values() for e in entries]
    assert len(set(files)) == len(files) == len(accepted)  # "x/y" and "x_y" both kept
    real_pool = pool.resolve()
    for f in files:
        path = (pool / f).resolve()
        assert path.parent.parent == real_pool and path.is_file(), f
        assert ".." not in Path(f).parts and "\\" not in f and "\x00" not in f
    assert index["3"][0]["file"].startswith("evil_3/")  # not the linked folder
    stored = {r["sample_id"]: r for r in accepted}
    for entries in index.values():
        for e in entries:
            _check_cutout((pool / e["file"]).read_bytes(), stored[e["sample_id"]])
    xpaste = json.loads((pool / "xpaste_pool.json").read_text())
    assert sorted(p[1:] for v in xpaste.values() for p in v) == sorted(
        os.path.abspath(pool / f) for f in files)


def test_overwrite_deletes_only_files_inside_the_pool(run_dir, tmp_path: Path) -> None:
    run, _ = run_dir
    pool = tmp_path / "pool"
    assert invoke_cli("export-pool", str(run), str(pool), "--class", "yak")[0] == 0
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    index = json.loads((pool / "pool.json").read_text())
    index["3"] += [{"file": "../victim.png"}, {"file": str(victim)}, {"file": "a/../../victim.png"}]
    (pool / "pool.json").write_text(json.dumps(index))
    code, text = invoke_cli("export-pool", str(run), str(pool), "--overwrite", "--class", "cat")
    assert code == 0, text
    assert victim.read_bytes() == b"keep me"
    assert list(json.loads((pool / "pool.json").read_text())) == ["1"]


def test_nothing_matched_is_an_error_naming_the_filters(run_dir, tmp_path: Path) -> None:
    run, _ = run_dir
    pool = tmp_path / "pool"
    code, text = invoke_cli("export-pool", str(run), str(pool), "--class", "dog", "--where",
                            "score > 5")
    assert code == 1 and len(text.strip().splitlines()) == 1
    assert "nothing to export" in text and "class=dog" in text and "where=(score > 5)" in text
    assert not pool.exists()
    # An existing pool is left as it was, even with --overwrite.
    assert invoke_cli("export-pool", str(run), str(pool), "--class", "yak")[0] == 0
    before = (pool / "pool.json").read_text()
    code, text = invoke_cli("export-pool", str(run), str(pool), "--overwrite", "--where",
                            "step > 1000")
    assert code == 1 and "nothing to export" in text
    assert (pool / "pool.json").read_text() == before


def test_where_cannot_widen_the_class_filter(run_dir, tmp_path: Path) -> None:
    run, _ = run_dir
    code, text = invoke_cli("export-pool", str(run), str(tmp_path / "pool"), "--class", "dog",
                            "--where", "1=1) OR (1=1")
    assert code == 1 and text.startswith("Error: --where '1=1) OR (1=1': unbalanced parenthes")
    assert "one boolean expression" in text and not (tmp_path / "pool").exists()


def test_no_shards_is_one_line(tmp_path: Path) -> None:
    code, text = invoke_cli("export-pool", str(tmp_path), str(tmp_path / "pool"))
    assert code == 1 and "no decision shards found" in text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "pool").exists()


@pytest.mark.s3
def test_export_from_and_to_s3(s3_server, tmp_path: Path) -> None:
    import s3fs

    bucket = s3_server.make_bucket("export-test")
    rows = make_rows()
    write_run(f"{bucket}/run", rows, s3_server.storage_options)
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    # X-Paste's loader opens local paths: an s3:// pool needs the folder it will be synced to.
    code, text = invoke_cli("export-pool", f"{bucket}/run", f"{bucket}/pool", "--endpoint-url",
                            s3_server.endpoint_url, "--class", "yak")
    assert code == 1 and "--xpaste-root" in text and "aws s3 sync" in text
    assert not fs.exists(f"{bucket}/pool")
    synced = tmp_path / "synced"
    code, text = invoke_cli("export-pool", f"{bucket}/run", f"{bucket}/pool", "--endpoint-url",
                            s3_server.endpoint_url, "--class", "yak", "--class", "cat",
                            "--xpaste-root", str(synced))
    assert code == 0, text
    index = json.loads(fs.cat(f"{bucket}/pool/pool.json"))
    entry = index["3"][0]  # yak has one accepted instance
    assert len(index["3"]) == 1
    row = next(r for r in rows if r["sample_id"] == entry["sample_id"])
    _check_cutout(fs.cat(f"{bucket}/pool/{entry['file']}"), row)
    # After a sync (here: s3fs's recursive get) every xpaste_pool.json path opens.
    fs.get(f"{bucket}/pool/", str(synced), recursive=True)
    xpaste = json.loads((synced / "xpaste_pool.json").read_text())
    assert sorted(xpaste) == ["0", "2"]  # LVIS id - 1
    paths = [p for v in xpaste.values() for p in v]
    assert len(paths) == sum(len(v) for v in index.values())
    for p in paths:
        assert p.startswith(f"*{synced}/") and Image.open(p[1:]).mode == "RGBA"
    code, text = invoke_cli("export-pool", f"{bucket}/run", str(tmp_path / "p"),
                            "--endpoint-url", s3_server.endpoint_url, "--xpaste-root", "rel/dir")
    assert code == 1 and "absolute local folder" in text

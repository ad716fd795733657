"""A pool as the candidate source (generation.backend: pool), with real parts: pools written
by `bsgal export-pool` read back, an earlier run's shards, a pool on a real S3 server (moto),
corrupt entries, and the class-balanced cycling draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotators.cutout import rgba_cutout
from annotators.quality import QualityCheck
from generators.pool_sampler import PoolSampler
from pipeline.config import ConfigError, load_config
from pipeline.run.pool_entries import EntryReader
from pipeline.run.pool_source import pool_draws
from pipeline.run.pool_stage import PoolReader, place_on_canvas
from pipeline.run.rows import candidate_columns
from pipeline.storage.pool_index import PoolFormatError, read_pool
from pipeline.storage.shards import list_shard_files, read_decisions
from tests.conftest import invoke_cli, make_rows, write_run

#: The vocabulary of make_rows (conftest PLAN), as a training set's categories.
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "yak"}]


def pool_config(pool: str, *extra: str):
    return load_config("configs/demo.yaml", ["generation.backend=pool", f"generation.pool={pool}",
                                             *extra])


def accepted_cutouts(rows: list[dict]) -> dict[str, np.ndarray]:
    """sample id → RGBA cut-out of every accepted row of ``rows``."""
    return {r["sample_id"]: rgba_cutout(r["image"], r["mask"]) for r in rows
            if r["reason"] == "accepted"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """An earlier run's shards and the pool `bsgal export-pool` made of them."""
    base = tmp_path_factory.mktemp("pool")
    rows = make_rows()
    write_run(str(base / "run"), rows)
    code, text = invoke_cli("export-pool", str(base / "run"), str(base / "pool"))
    assert code == 0, text
    return base, rows


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("index_file", ["xpaste_pool.json", "pool.json"])
def test_export_pool_read_back_gives_the_same_cutouts_and_classes(exported, index_file) -> None:
    base, rows = exported
    index = read_pool(str(base / "pool" / index_file))
    assert index.format == ("xpaste" if index_file.startswith("xpaste") else "bsgal")
    cutouts = accepted_cutouts(rows)
    by_id = {r["sample_id"]: r for r in rows}
    # Same classes, as many instances per class as were accepted.
    want = {cid: sum(1 for r in rows if r["class_id"] == cid and r["reason"] == "accepted")
            for cid in (1, 2, 3)}
    assert dict(zip(index.class_ids.tolist(), index.counts.tolist())) == want
    reader = EntryReader()
    for k, cid in enumerate(index.class_ids):
        for e in range(index.starts[k], index.starts[k + 1]):
            rgba, mask = reader.read(index.refs[e])
            if index.format == "bsgal":
                sid = index.source_ids[e]
            else:  # X-Paste entries are paths "*<pool>/<class>/<sample id>.png"
                sid = Path(index.source_ids[e]).stem
            assert by_id[sid]["class_id"] == cid
            np.testing.assert_array_equal(rgba, cutouts[sid])  # pixel for pixel
            np.testing.assert_array_equal(mask, cutouts[sid][..., 3] > 0)
    if index.format == "bsgal":
        assert np.allclose(index.mask_scores, 0.9) and index.class_names == {
            1: "cat", 2: "dog", 3: "yak"}
    else:
        assert np.isnan(index.mask_scores).all()


def test_draw_rows_through_the_reader_and_checks_keep_provenance(exported) -> None:
    base, rows = exported
    pool = str(base / "pool" / "pool.json")
    draws = pool_draws(pool_config(pool), CATEGORIES)
    batch = draws.sample_batch(30)
    out = QualityCheck()(PoolReader(image_size=64, fill=0.8)(batch))
    assert (out["status"] == "ok").all(), out["error"]
    assert out["image"].shape == (30, 64, 64, 3) and out["mask"].shape == (30, 64, 64)
    assert set(out["source"]) == {pool} and set(out["generator"]) == {"pool:bsgal@1"}
    accepted = {r["sample_id"]: r for r in rows if r["reason"] == "accepted"}
    for i in range(30):
        original = accepted[out["source_id"][i]]  # the entry's own id: the old sample id
        assert original["class_id"] == out["class_id"][i]
        assert out["class_name"][i] == original["class_name"]
        # Placed at 80% of the canvas: the longer side of the mask's box is 51 px of 64.
        ys, xs = np.nonzero(out["mask"][i])
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 == round(0.8 * 64)
        assert out["mask_score"][i] == pytest.approx(0.9)
    # The provenance columns reach the decision row (the train worker copies these).
    assert {"source", "source_id", "generator", "annotator"} <= set(candidate_columns())


def test_earlier_run_shards_as_a_pool(exported) -> None:
    base, rows = exported
    run = str(base / "run")
    accepted = read_pool(run)
    assert accepted.format == "shards" and len(accepted) == 10
    both = read_pool(run, "shards", decisions=("accepted", "rejected"))
    assert len(both) == 19
    reader = EntryReader()
    by_id = {r["sample_id"]: r for r in rows}
    for e in range(len(both)):
        sid = both.source_ids[e]
        rgba, _ = reader.read(both.refs[e])
        np.testing.assert_array_equal(rgba, rgba_cutout(by_id[sid]["image"],
                                                        by_id[sid]["mask"]))
    assert both.class_names == {1: "cat", 2: "dog", 3: "yak"}


def test_version_1_shards_are_still_read(tmp_path: Path) -> None:
    write_run(str(tmp_path), make_rows()[:4])
    for path in list_shard_files(str(tmp_path / "shards")):
        table = pq.read_table(path).drop_columns(["source", "source_id"])
        pq.write_table(table.replace_schema_metadata({b"bsgal.schema_version": b"1"}), path)
    table = read_decisions(str(tmp_path))
    assert table.num_rows == 4 and table.column("source").null_count == 4
    code, text = invoke_cli("inspect", str(tmp_path))
    assert code == 0, text


# ------------------------------------------------------------------------- sampling


def test_draws_are_class_balanced_cycle_and_get_a_new_id_each() -> None:
    counts = np.array([1, 7, 300])
    entries = {e: f"entry-{e}" for e in range(int(counts.sum()))}
    sampler = PoolSampler(np.array([5, 6, 9]), counts, run_id="r", seed=3, pool="p",
                          source_ids=entries.__getitem__)
    n = 6000
    rows = sampler.sample_batch(n)
    per_class = np.bincount(np.searchsorted([5, 6, 9], rows["class_id"]), minlength=3)
    # A class uniformly (not by size): each third within 4 standard deviations.
    assert np.all(np.abs(per_class - n / 3) < 4 * np.sqrt(n * (1 / 3) * (2 / 3)))
    assert len(set(rows["sample_id"])) == n  # every draw is a new row
    for k, cid in enumerate([5, 6, 9]):
        drawn = rows["pool_entry"][rows["class_id"] == cid]
        size = int(counts[k])
        lo = int(counts[:k].sum())
        assert drawn.min() >= lo and drawn.max() < lo + size
        # Every epoch of the class draws each of its entries exactly once, in a new order.
        epochs = [drawn[i:i + size] for i in range(0, len(drawn) - size + 1, size)]
        assert len(epochs) >= 2
        for ep in epochs:
            assert sorted(ep.tolist()) == list(range(lo, lo + size))
        if size > 2:
            assert not np.array_equal(epochs[0], epochs[1])
    # Positions give the same draws in any order (what a resume asks for).
    pick = np.array([5999, 3, 1200, 4])
    again = sampler.sample_positions(pick)
    for key in ("sample_id", "class_id", "pool_entry"):
        np.testing.assert_array_equal(again[key], rows[key][pick])
    other = PoolSampler(np.array([5, 6, 9]), counts, run_id="r", seed=4, pool="p")
    assert not np.array_equal(other.sample_batch(50)["class_id"], rows["class_id"][:50])


def test_canvas_keeps_the_aspect_and_whitens_the_background() -> None:
    rgba = np.zeros((10, 40, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[2:8, :, 3] = 255
    image, mask = place_on_canvas(rgba, rgba[..., 3] > 0, 100, 0.5)
    ys, xs = np.nonzero(mask)
    assert xs.max() - xs.min() + 1 == 50 and ys.max() - ys.min() + 1 == 8
    assert (image[~mask] == 255).all() and (image[mask] == (10, 20, 30)).all()


# ------------------------------------------------------------------------- corrupt pools


def _png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _rgba(h: int = 20, w: int = 16) -> np.ndarray:
    a = np.zeros((h, w, 4), np.uint8)
    a[3:h - 3, 2:w - 2] = (40, 200, 90, 255)
    return a


def test_corrupt_entries_become_invalid_rows_that_name_the_file(tmp_path: Path) -> None:
    img = tmp_path / "images"
    _png(img / "0" / "good.png", _rgba(), "RGBA")
    _png(img / "41" / "0.png", _rgba(), "RGBA")
    (img / "0" / "garbage.png").write_bytes(b"not a png at all")
    _png(img / "0" / "rgb.png", _rgba()[..., :3], "RGB")
    _png(img / "0" / "clear.png", np.zeros((8, 8, 4), np.uint8), "RGBA")
    two = np.zeros((20, 30, 4), np.uint8)
    two[2:6, 2:6, 3] = 255
    two[8:18, 10:28] = (1, 2, 3, 255)
    _png(img / "1" / "two_parts.png", two, "RGBA")
    _png(img / "1" / "photo.png", np.full((20, 30, 3), 77, np.uint8), "RGB")
    _png(img / "1" / "grey.png", np.where(two[..., 3] > 0, 255, 0).astype(np.uint8), "L")
    _png(img / "1" / "small_grey.png", np.zeros((5, 5), np.uint8), "L")
    pool = {"0": ["*images/0/good.png", "*images/0/garbage.png", "*images/0/rgb.png",
                  "*images/0/clear.png", "*images/0/gone.png"],
            "1": ["images/1/two_parts.png", "images/1/photo.png|images/1/grey.png",
                  "images/1/photo.png|images/1/small_grey.png"],
            "41": ["*images/41/0.png"]}  # LVIS id 42: not a class of the training set
    (tmp_path / "pool.json.x").write_text(json.dumps(pool))
    path = tmp_path / "xpaste.json"
    (tmp_path / "pool.json.x").rename(path)
    two = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    # By default a class the training set lacks refuses the run at the start, naming it.
    with pytest.raises(PoolFormatError, match='1 of the pool.s 3 classes.*key "41".*'
                                              "pool_unknown_classes=rows"):
        pool_draws(pool_config(str(path), "selection.quality_gates={}"), two)
    draws = pool_draws(pool_config(str(path), "selection.quality_gates={}",
                                   "generation.pool_unknown_classes=rows"), two)
    index = draws.index
    by_source = {}
    for start in range(0, 120, 40):
        batch = PoolReader(image_size=64)(draws.sample_batch(40, start))
        for sid, status, error, mask in zip(batch["source_id"], batch["status"],
                                            batch["error"], batch["mask"]):
            by_source[sid] = (status, error, int(mask.sum()))
    assert set(by_source) == {e for v in pool.values() for e in v}  # nothing dropped
    expect = {
        "*images/0/good.png": "ok",
        "*images/0/garbage.png": "invalid_pool_entry",
        "*images/0/rgb.png": "invalid_pool_entry",
        "*images/0/clear.png": "invalid_pool_entry",
        "*images/0/gone.png": "invalid_pool_missing",
        "images/1/two_parts.png": "ok",
        "images/1/photo.png|images/1/grey.png": "ok",
        "images/1/photo.png|images/1/small_grey.png": "invalid_pool_entry",
    }
    for sid, status in expect.items():
        assert by_source[sid][0] == status, (sid, by_source[sid])
    assert str(img / "0" / "garbage.png") in by_source["*images/0/garbage.png"][1]
    assert "no alpha channel" in by_source["*images/0/rgb.png"][1]
    assert "mask is empty" in by_source["*images/0/clear.png"][1]
    assert "no such file" in by_source["*images/0/gone.png"][1]
    assert "pool_path_map" in by_source["*images/0/gone.png"][1]
    assert "differ" not in by_source["images/1/photo.png|images/1/small_grey.png"][1]
    assert "5 x 5" in by_source["images/1/photo.png|images/1/small_grey.png"][1]
    # PATH form: thresholded, the largest part kept (the 10 x 18 block, not the 4 x 4 one).
    rgba, mask = EntryReader().read(index.refs[int(np.flatnonzero(
        [index.source_ids[e] == "images/1/two_parts.png" for e in range(len(index))])[0])])
    assert mask.shape == (10, 18) and mask.all()
    # The class the training set lacks: invalid rows that name the pool file and its key.
    rows = draws.sample_batch(120)
    unknown = rows["class_id"] == 42
    assert unknown.any() and (rows["status"][unknown] == "invalid_unknown_class").all()
    assert str(path) in rows["error"][unknown][0] and 'key "41"' in rows["error"][unknown][0]


@pytest.mark.parametrize("doc, match", [
    ([["*a.png"]], "JSON list, not an object"),
    ({"cat": ["*a.png"]}, "key 'cat' is not a class number"),
    ({"0": "*a.png"}, "holds a str, not a list"),
    ({"0": [{"file": "a.png"}]}, "entry 0 of key '0'"),
    ({"0": []}, "holds no entries"),
    ({"500": ["*a.png"]}, "none of the pool's 1 classes"),
])
def test_pool_in_the_wrong_layout_is_an_error_naming_the_file(tmp_path: Path, doc,
                                                              match) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PoolFormatError, match=match) as info:
        pool_draws(pool_config(str(path), "selection.quality_gates={}"), CATEGORIES)
    assert str(path) in str(info.value)


def test_pool_errors_before_anything_runs(tmp_path: Path, exported) -> None:
    with pytest.raises(PoolFormatError, match="does not exist"):
        read_pool(str(tmp_path / "nowhere.json"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(PoolFormatError, match="holds neither pool.json"):
        read_pool(str(tmp_path / "folder"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PoolFormatError, match="not a JSON file"):
        read_pool(str(tmp_path / "bad.json"))
    base, _ = exported
    # An X-Paste pool records no mask score: the demo's mask_score gate could never pass.
    with pytest.raises(ConfigError, match="quality_gates"):
        pool_draws(pool_config(str(base / "pool" / "xpaste_pool.json")), CATEGORIES)
    with pytest.raises(ConfigError, match="generation.pool: required"):
        load_config("configs/demo.yaml", ["generation.backend=pool"])
    # A pool made for another vocabulary (same id, other name): refused, or invalid rows.
    other = [{"id": 1, "name": "cat"}, {"id": 2, "name": "wolf"}, {"id": 3, "name": "yak"}]
    with pytest.raises(PoolFormatError, match="'dog' in the pool but 'wolf'"):
        pool_draws(pool_config(str(base / "pool")), other)
    draws = pool_draws(pool_config(str(base / "pool"), "generation.pool_unknown_classes=rows"),
                       other)
    rows = draws.sample_batch(40)
    dog = rows["class_id"] == 2
    assert (rows["status"][dog] == "invalid_unknown_class").all()
    assert "'dog' in the pool but 'wolf'" in rows["error"][dog][0]
    assert (rows["status"][~dog] == "ok").all()


# ------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_pool_on_s3(s3_server, tmp_path: Path) -> None:
    import s3fs

    bucket = s3_server.make_bucket("pool-source")
    rows = make_rows()
    write_run(f"{bucket}/run", rows, s3_server.storage_options)
    synced = "/data/synced-pool"
    code, text = invoke_cli("export-pool", f"{bucket}/run", f"{bucket}/pool", "--endpoint-url",
                            s3_server.endpoint_url, "--xpaste-root", synced)
    assert code == 0, text
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.rm(f"{bucket}/pool/" + json.loads(fs.cat(f"{bucket}/pool/pool.json"))["2"][0]["file"])
    cutouts = accepted_cutouts(rows)
    opts = {"endpoint_url": s3_server.endpoint_url}
    # pool.json (relative entries, against the JSON's s3:// folder), the X-Paste JSON (its
    # local paths mapped to the bucket) and the run's shards, all read on S3.
    for pool, extra in ((f"{bucket}/pool", []),
                        (f"{bucket}/pool/xpaste_pool.json",
                         ["selection.quality_gates={}",
                          f"generation.pool_path_map={{{synced}: '{bucket}/pool'}}"]),
                        (f"{bucket}/run", [])):
        cfg = pool_config(pool, f"generation.pool_storage_options={json.dumps(opts)}", *extra)
        draws = pool_draws(cfg, CATEGORIES)
        batch = PoolReader(64, storage_options=opts)(draws.sample_batch(40))
        ok = batch["status"] == "ok"
        assert ok.sum() >= 30
        missing = batch["status"] == "invalid_pool_missing"
        if draws.index.format == "shards":
            assert not missing.any()
        else:  # the one cut-out deleted from the bucket
            assert missing.any() and all(f"{bucket}/pool/" in e for e in batch["error"][missing])
        reader = EntryReader(opts)
        for i in np.flatnonzero(ok)[:5]:
            rgba, _ = reader.read(batch["pool_ref"][i])
            sid = batch["source_id"][i]
            sid = sid if sid in cutouts else Path(sid).stem
            np.testing.assert_array_equal(rgba, cutouts[sid])


def test_a_folder_of_plain_images_per_class_is_annotated_during_the_run(tmp_path: Path) -> None:
    from annotators import build_annotator
    from generators.looks import make_looks, render_object
    from pipeline.demand import run_requests
    from pipeline.run.graph import stage_specs

    root = tmp_path / "images"
    looks = make_looks(3)
    rng = np.random.default_rng(0)
    for cid, name in ((1, "cat"), (2, "dog")):
        (root / name).mkdir(parents=True)
        for n in range(3):
            image = np.full((48, 40, 3), 255, np.uint8)
            rgb, m = render_object(looks[cid - 1], 24, 20, rng)
            image[12:36, 10:30][m] = rgb[m]
            Image.fromarray(image).save(root / name / f"{n}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    cfg = pool_config(str(root), "generation.pool_format=images")
    assert [s.name for s in stage_specs(cfg, CATEGORIES)] == ["generate", "annotate", "check"]
    assert "annotation" in {r.part for r in run_requests(cfg)}
    draws = pool_draws(cfg, CATEGORIES)
    assert sorted(draws.index.class_ids.tolist()) == [1, 2] and len(draws.index) == 7
    batch = draws.sample_batch(14)
    out = QualityCheck()(build_annotator("builtin")(PoolReader(image_size=64)(batch)))
    broken = np.array(["broken.png" in s for s in out["source_id"]])
    assert broken.any() and (out["status"][broken] == "invalid_pool_entry").all()
    assert all("broken.png" in e for e in out["error"][broken])
    good = ~broken
    assert (out["status"][good] == "ok").all(), out["error"][good]
    assert all(out["mask"][i].sum() > 50 for i in np.flatnonzero(good))  # cut out here
    assert np.isfinite(out["mask_score"][good]).all()
    assert not any("notes.txt" in s for s in out["source_id"])
    (root / "wolf").mkdir()
    (root / "wolf" / "0.png").write_bytes((root / "cat" / "0.png").read_bytes())
    with pytest.raises(PoolFormatError, match="folder 'wolf' is not a class"):
        pool_draws(cfg, CATEGORIES)


def test_a_relative_entry_that_leaves_the_pool_folder_is_an_invalid_row(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    _png(outside, _rgba(), "RGBA")
    pool_dir = tmp_path / "pools" / "p"
    _png(pool_dir / "images" / "0" / "in.png", _rgba(), "RGBA")
    (pool_dir / "x.json").write_text(json.dumps(
        {"0": ["*images/0/in.png", "*../../outside.png", "images/../images/0/in.png"]}))
    draws = pool_draws(pool_config(str(pool_dir / "x.json"), "selection.quality_gates={}"),
                       CATEGORIES)
    batch = PoolReader(image_size=64)(draws.sample_batch(12))
    by_source = dict(zip(batch["source_id"], zip(batch["status"], batch["error"])))
    assert by_source["*../../outside.png"][0] == "invalid_pool_entry"
    assert "leaves the pool's folder" in by_source["*../../outside.png"][1]
    assert by_source["*images/0/in.png"][0] == "ok"
    assert by_source["images/../images/0/in.png"][0] == "ok"  # stays inside: followed


def test_an_xpaste_pool_saved_as_pool_json_is_read_as_xpaste(tmp_path: Path) -> None:
    folder = tmp_path / "xp"
    _png(folder / "images" / "0" / "a.png", _rgba(), "RGBA")
    (folder / "pool.json").write_text(json.dumps({"0": ["*images/0/a.png"]}))
    for given in (folder / "pool.json", folder):
        index = read_pool(str(given))
        assert index.format == "xpaste" and len(index) == 1, given
    assert read_pool(str(folder), "xpaste").format == "xpaste"  # the format key still wins


def test_a_rescore_may_set_what_describes_its_source(tmp_path: Path) -> None:
    from pipeline.run.rescore import SOURCE_KEYS
    from pipeline.storage.run_config import resume_config, write_run_config
    from pipeline.storage.run_dir import RunDir

    out = tmp_path / "run"
    cfg = load_config("configs/demo.yaml", [f"output.dir={out}"])
    run = RunDir(str(out))
    write_run_config(run, cfg)
    run.save_checkpoint(4, {"x": 1})
    keys = ["generation.pool_format=xpaste", "selection.quality_gates={}"]
    with pytest.raises(ConfigError, match="cannot change here"):
        resume_config(str(out), keys)
    got = resume_config(str(out), keys, also_allowed=SOURCE_KEYS, flag="rescore")
    assert got.generation.pool_format == "xpaste" and got.selection.quality_gates == {}
    with pytest.raises(ConfigError, match="rescore: selection.alpha cannot change here"):
        resume_config(str(out), ["selection.alpha=0.2"], also_allowed=SOURCE_KEYS,
                      flag="rescore")


def test_check_reads_the_pool_as_the_run_will(tmp_path: Path, builtin_data: Path) -> None:
    from pipeline.run.preflight import preflight

    base = [f"output.dir={tmp_path / 'out'}", f"data.root={builtin_data}",
            "generation.backend=pool", "selection.quality_gates={}"]
    _png(tmp_path / "images" / "0" / "a.png", _rgba(), "RGBA")

    def problems(pool: object, *extra: str) -> list[str]:
        path = tmp_path / "p.json"
        path.write_text(pool if isinstance(pool, str) else json.dumps(pool))
        report = preflight(load_config("configs/demo.yaml", [*base, f"generation.pool={path}",
                                                             *extra]))
        return [p.line() for p in report.problems if p.key == "generation.pool"]

    assert any("not a JSON file" in p for p in problems('{"0": ["*images/0/a.png"'))
    assert any("is not a class number" in p for p in problems({"cat": ["*images/0/a.png"]}))
    assert any("JSON list" in p for p in problems([["*images/0/a.png"]]))
    assert any("not classes of the training set" in p
               for p in problems({"0": ["*images/0/a.png"], "99": ["*images/0/a.png"]}))
    gone = {"0": ["*images/0/a.png"] + [f"*images/0/gone{i}.png" for i in range(5)]}
    assert any("cannot be used" in p and "no such file" in p for p in problems(gone))
    assert problems({"0": ["*images/0/a.png"] * 3}) == []


def test_a_rescoring_of_an_exported_pool_keeps_the_run_ids_and_compares_with_the_run(
        exported) -> None:
    from pipeline.run.rescore import comparable_judgement

    base, rows = exported
    draws = pool_draws(pool_config(str(base / "pool")), CATEGORIES)
    ids = draws.every_entry()["sample_id"].tolist()
    assert sorted(ids) == sorted(r["sample_id"] for r in rows if r["reason"] == "accepted")
    assert comparable_judgement("bsgal", str(base / "pool"), {}) == str(base / "run")
    assert comparable_judgement("shards", str(base / "run"), {}) == str(base / "run")
    assert comparable_judgement("xpaste", str(base / "pool" / "xpaste_pool.json"), {}) is None

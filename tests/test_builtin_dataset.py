"""The built-in long-tailed set: deterministic, LVIS-loadable, long-tailed, and learnable."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import lvis
import numpy as np
import pytest

from trainer.datasets import DatasetFormatError, LvisDataset, write_builtin_dataset
from trainer.datasets.builtin import DatasetSizeError


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = dict(num_train_images=200, num_val_images=10, image_size=64)
    a = write_builtin_dataset(tmp_path / "a", seed=3, **kwargs)
    b = write_builtin_dataset(tmp_path / "b", seed=3, **kwargs)
    c = write_builtin_dataset(tmp_path / "c", seed=4, **kwargs)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_official_lvis_api_loads_both_splits(builtin_data: Path) -> None:
    for split in ("train.json", "val.json"):
        api = lvis.LVIS(str(builtin_data / split))
        assert len(api.get_img_ids()) > 0
        assert len(api.get_cat_ids()) == 12
        ann = api.load_anns(api.get_ann_ids()[:1])[0]
        mask = api.ann_to_mask(ann)
        assert mask.sum() == pytest.approx(ann["area"])
        for img in api.load_imgs(api.get_img_ids()):
            present = {a["category_id"] for a in api.load_anns(api.get_ann_ids(img_ids=[img["id"]]))}
            # Exhaustively annotated: every absent class is a verified negative.
            assert set(img["neg_category_ids"]) == set(api.get_cat_ids()) - present
            assert img["not_exhaustive_category_ids"] == []


def test_default_size_is_long_tailed_by_lvis_thresholds(tmp_path: Path) -> None:
    root = write_builtin_dataset(tmp_path / "full", seed=0)
    cats = json.loads((root / "train.json").read_text())["categories"]
    by_group = {g: [c["image_count"] for c in cats if c["frequency"] == g] for g in "fcr"}
    assert all(n > 100 for n in by_group["f"]), by_group
    assert all(11 <= n <= 100 for n in by_group["c"]), by_group
    assert all(1 <= n <= 10 for n in by_group["r"]), by_group
    assert len(by_group["r"]) == 4
    # Validation is class-balanced so APr is measurable: every class has instances there.
    val = json.loads((root / "val.json").read_text())
    val_counts = np.bincount([a["category_id"] for a in val["annotations"]], minlength=13)[1:]
    assert val_counts.min() >= 10, val_counts


@pytest.mark.parametrize("num_classes, train_images", [(3, 47), (12, 188), (12, 260), (5, 140)])
def test_frequency_is_the_lvis_group_of_the_images_written(tmp_path: Path, num_classes: int,
                                                           train_images: int) -> None:
    root = write_builtin_dataset(tmp_path, seed=2, num_classes=num_classes,
                                 num_train_images=train_images, num_val_images=3, image_size=64)
    train = json.loads((root / "train.json").read_text())
    assert len(train["images"]) == train_images
    holding: dict[int, set] = {c["id"]: set() for c in train["categories"]}
    for a in train["annotations"]:
        holding[a["category_id"]].add(a["image_id"])
    for c in train["categories"]:
        n = len(holding[c["id"]])
        assert n >= 1 and c["image_count"] == n, c["name"]
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f"), (c["name"], n)
    # The validation split carries the same labels.
    val = json.loads((root / "val.json").read_text())
    assert val["categories"] == train["categories"]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_train_images": 100}, "num_train_images=100 is below the minimum 188 (12 classes"),
    ({"num_train_images": 50}, "num_train_images=50 is below the minimum 188"),
    ({"num_train_images": -5}, "num_train_images=-5 is below the minimum 188"),
    ({"num_train_images": 187}, "num_train_images=187 is below the minimum 188"),
    ({"num_train_images": 10, "num_classes": 3}, "num_train_images=10 is below the minimum 47"),
    ({"num_train_images": 2.5}, "num_train_images=2.5 is not a whole number (minimum 188)"),
    ({"num_val_images": 0}, "num_val_images=0 is below the minimum 1"),
    ({"num_val_images": -5}, "num_val_images=-5 is below the minimum 1"),
    ({"num_classes": 2}, "num_classes=2 is below the minimum 3"),
    ({"image_size": 8}, "image_size=8 is below the minimum 16"),
])
def test_sizes_below_their_minimum_are_refused_before_writing(tmp_path: Path, kwargs: dict,
                                                              message: str) -> None:
    with pytest.raises(DatasetSizeError, match="^" + re.escape(message)):
        write_builtin_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_dataset_records_match_pixels(builtin_data: Path) -> None:
    ds = LvisDataset(str(builtin_data), "train.json")
    assert ds.num_classes == 12 and len(ds) == 240
    sample = ds[0]
    assert sample["image"].shape == (128, 128, 3) and sample["image"].dtype == np.uint8
    n = len(sample["labels"])
    assert n >= 1 and sample["masks"].shape == (n, 128, 128) and sample["boxes"].shape == (n, 4)
    for box, mask in zip(sample["boxes"], sample["masks"]):
        ys, xs = np.nonzero(mask)
        assert box[0] == xs.min() and box[1] == ys.min()
        assert box[2] == xs.max() + 1 and box[3] == ys.max() + 1
    # Objects are saturated colours on a desaturated background: the mask is where the colour is.
    img = sample["image"].astype(int)
    sat = img.max(axis=2) - img.min(axis=2)
    fg = sample["masks"].any(axis=0)
    assert sat[fg].mean() > 3 * sat[~fg].mean()
    assert set(sample["labels"].tolist()) <= set(range(1, 13))


def test_missing_and_malformed_files_name_file_and_field(tmp_path: Path, builtin_data: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"nope\.json: file not found"):
        LvisDataset(str(tmp_path), "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"broken\.json: not valid JSON"):
        LvisDataset(str(tmp_path), "broken.json")
    data = json.loads((builtin_data / "val.json").read_text())
    del data["categories"][2]["frequency"]
    (tmp_path / "nofreq.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"nofreq\.json: category id=3 has no field 'frequency'"):
        LvisDataset(str(tmp_path), "nofreq.json")
    data = json.loads((builtin_data / "val.json").read_text())
    data["annotations"][0]["category_id"] = 999
    (tmp_path / "badcat.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match="field 'category_id' is 999"):
        LvisDataset(str(tmp_path), "badcat.json")


def test_undecodable_image_names_the_file(tmp_path: Path, builtin_data: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(builtin_data, root)
    ds = LvisDataset(str(root), "val.json")
    bad = root / "images" / ds.images[0]["file_name"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetFormatError, match=r"val/000000\.png: image does not decode"):
        ds.load_image(0)
    (root / "images" / ds.images[1]["file_name"]).unlink()
    with pytest.raises(DatasetFormatError, match=r"val/000001\.png: image file not found"):
        ds.load_image(1)
    # The others still load.
    assert ds.load_image(2).shape == (128, 128, 3)


@pytest.mark.s3
def test_loads_from_s3_through_moto(builtin_data: Path, s3_server) -> None:
    import s3fs

    bucket = s3_server.make_bucket("lvis-data")
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.put(str(builtin_data / "val.json"), f"{bucket}/set/val.json")
    local = LvisDataset(str(builtin_data), "val.json", max_images=3)
    for i in range(3):
        name = local.images[i]["file_name"]
        fs.put(str(builtin_data / "images" / name), f"{bucket}/set/images/{name}")
    remote = LvisDataset(f"{bucket}/set", "val.json", storage_options=s3_server.storage_options,
                         max_images=3)
    for i in range(3):
        np.testing.assert_array_equal(remote.load_image(i), local.load_image(i))
        np.testing.assert_array_equal(remote.instances(i)["masks"], local.instances(i)["masks"])
    with pytest.raises(DatasetFormatError, match="image file not found"):
        LvisDataset(f"{bucket}/set", "val.json", storage_options=s3_server.storage_options,
                    max_images=4).load_image(3)

"""The built-in long-tailed instance-segmentation set: the embedded default's real data.

Procedural 128 x 128 scenes with 1-4 objects each, ``num_classes`` classes whose looks come from
:mod:`generators.looks`, planned in turn as frequent, common and rare: a rare class is drawn in
2-6 training images, a common one in 15-40, the frequent ones fill the other object slots
(> 100 images each at the default size). Each category's ``frequency`` is then LVIS's group of
the number of training images that really contain it (rare 1-10, common 11-100, frequent
> 100; :func:`lvis_frequency`), so on a small set a planned frequent class is labelled common,
and a label never contradicts ``image_count``. The validation split is class-balanced so that
APr can be measured. Everything is written as an LVIS-format folder that the official ``lvis``
package loads::

    OUT/train.json  OUT/val.json  OUT/images/train/000000.png  OUT/images/val/000000.png

Deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from generators.looks import (
    BUILTIN_GROUPS,
    ObjectLook,
    builtin_class_name,
    make_looks,
    render_object,
)

# Training images that contain a class of each planned group (inclusive ranges).
RARE_IMAGES = (2, 6)
COMMON_IMAGES = (15, 40)
# A real instance that keeps less than this fraction of its pixels after occlusion is dropped.
MIN_VISIBLE_FRACTION = 0.4
# LVIS's frequency groups by training images containing the class: rare 1-10, common 11-100.
LVIS_RARE_MAX_IMAGES = 10
LVIS_COMMON_MAX_IMAGES = 100
MIN_CLASSES = 3
MIN_IMAGE_SIZE = 16  # objects are 8 px at the least
# The files write_builtin_dataset writes (what --force may delete), besides train/val.json.
_IMAGE_FILE = re.compile(r"\d{6,}\.png(\.tmp)?")


class DatasetSizeError(ValueError):
    """A size argument of :func:`write_builtin_dataset` below its minimum (or not a whole
    number); ``name``, ``value`` and ``minimum`` say which, ``why`` what is wrong with it
    ("is below the minimum 188 (...)")."""

    def __init__(self, name: str, value: object, minimum: int, why: str) -> None:
        self.name, self.value, self.minimum, self.why = name, value, minimum, why
        super().__init__(f"{name}={value!r} {why}")


def lvis_frequency(image_count: int) -> str:
    """LVIS's frequency group of a class in ``image_count`` training images: ``r`` (1-10),
    ``c`` (11-100) or ``f`` (more)."""
    if image_count < 1:
        raise ValueError(f"a class in {image_count} training images has no LVIS frequency group")
    if image_count <= LVIS_RARE_MAX_IMAGES:
        return "r"
    return "c" if image_count <= LVIS_COMMON_MAX_IMAGES else "f"


def _require(name: str, value: object, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DatasetSizeError(name, value, minimum, f"is not a whole number (minimum {minimum})")
    if value < minimum:
        raise DatasetSizeError(name, value, minimum, f"is below the minimum {minimum} ({why})")


def _planned_groups(num_classes: int) -> dict[str, int]:
    groups = [BUILTIN_GROUPS[k % 3] for k in range(num_classes)]
    return {g: groups.count(g) for g in BUILTIN_GROUPS}


def min_train_images(num_classes: int) -> int:
    """The fewest training images that always hold the plan, whatever the seed: every rare and
    common class at its most planned images, plus one image per frequent class (an image may
    hold a single object)."""
    n = _planned_groups(num_classes)
    return n["r"] * RARE_IMAGES[1] + n["c"] * COMMON_IMAGES[1] + n["f"]


def check_builtin_sizes(num_classes: int, num_train_images: int, num_val_images: int,
                        image_size: int) -> None:
    """Raise :class:`DatasetSizeError` naming the first size below its minimum; the one check
    behind the Python API and ``bsgal data synth``."""
    _require("num_classes", num_classes, MIN_CLASSES, "one class per frequency group")
    n = _planned_groups(int(num_classes))
    _require("num_train_images", num_train_images, min_train_images(int(num_classes)),
             f"{num_classes} classes: up to {RARE_IMAGES[1]} images for each of the {n['r']} "
             f"rare classes, {COMMON_IMAGES[1]} for each of the {n['c']} common ones and 1 for "
             f"each of the {n['f']} frequent ones")
    _require("num_val_images", num_val_images, 1, "the validation split needs an image")
    _require("image_size", image_size, MIN_IMAGE_SIZE, "objects are drawn at least 8 px wide")


@dataclass(frozen=True)
class BuiltinClass:
    """One class of the built-in set: LVIS category fields plus its look."""

    id: int
    name: str
    group: str  # planned LVIS frequency group: "f", "c" or "r"
    look: ObjectLook


def builtin_classes(num_classes: int) -> list[BuiltinClass]:
    """The class catalogue: ids 1..K, names from the look, planned groups f/c/r in turn."""
    _require("num_classes", num_classes, MIN_CLASSES, "one class per frequency group")
    classes = []
    for k, look in enumerate(make_looks(num_classes)):
        classes.append(BuiltinClass(id=k + 1, name=builtin_class_name(k, look),
                                    group=BUILTIN_GROUPS[k % 3], look=look))
    return classes


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A light, desaturated background: plain with mild noise, or low-contrast blotches."""
    base = rng.uniform(150, 235)
    tint = rng.uniform(-12, 12, size=3)
    img = np.full((size, size, 3), base, dtype=np.float32) + tint
    if rng.random() < 0.5:
        coarse = rng.uniform(-25, 25, size=(8, 8, 1)).astype(np.float32)
        blotches = np.asarray(
            Image.fromarray(((coarse[..., 0] + 25) * 5).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR
            ),
            dtype=np.float32,
        ) / 5 - 25
        img += blotches[..., None]
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / float(aw * ah + bw * bh - inter)


def render_scene(
    classes: list[BuiltinClass], class_ids: list[int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw objects of ``class_ids`` (in order, later on top) on a background.

    Returns:
        ``image``: size x size x 3 uint8; ``instances``: (class id, size x size bool mask) of
        every object still at least :data:`MIN_VISIBLE_FRACTION` visible.
    """
    by_id = {c.id: c for c in classes}
    canvas = _background(size, rng)
    placed: list[list] = []  # [class_id, mask, original_area, box]
    for cid in class_ids:
        side = rng.uniform(0.2, 0.45) * size
        aspect = rng.uniform(0.75, 1.33)
        h = int(np.clip(side * aspect**0.5, 8, size - 2))
        w = int(np.clip(side / aspect**0.5, 8, size - 2))
        box = (0, 0, w, h)
        for _ in range(12):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x, y, w, h)
            if all(_box_iou(box, p[3]) < 0.25 for p in placed):
                break
        rgb, local = render_object(by_id[cid].look, h, w, rng)
        x, y = box[0], box[1]
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + h, x : x + w] = local
        region = canvas[y : y + h, x : x + w]
        region[local] = rgb[local]
        for p in placed:
            p[1] &= ~mask
        placed.append([cid, mask, int(mask.sum()), box])
    instances = [
        (cid, m) for cid, m, area, _ in placed if area > 0 and m.sum() >= MIN_VISIBLE_FRACTION * area
    ]
    return canvas.astype(np.uint8), instances


def _plan_train(
    classes: list[BuiltinClass], num_images: int, rng: np.random.Generator
) -> list[list[int]]:
    """Class ids per training image so that each group gets its planned image count."""
    slots = np.clip(1 + rng.poisson(1.3, size=num_images), 1, 4)
    plan: list[list[int]] = [[] for _ in range(num_images)]
    for cls in classes:
        if cls.group == "f":
            continue
        lo, hi = RARE_IMAGES if cls.group == "r" else COMMON_IMAGES
        count = int(rng.integers(lo, hi + 1))
        free = [i for i in range(num_images) if len(plan[i]) < slots[i]]
        # Enough free slots for any draw: check_builtin_sizes (min_train_images).
        for i in rng.choice(free, size=count, replace=False):
            plan[int(i)].append(cls.id)
    frequent = [c.id for c in classes if c.group == "f"]
    # Draw frequent classes first so that the few rare instances end up on top, unoccluded.
    order = {"f": 0, "c": 1, "r": 2}
    group = {c.id: c.group for c in classes}
    for i in range(num_images):
        while len(plan[i]) < slots[i]:
            plan[i].append(int(rng.choice(frequent)))
        plan[i] = [int(cid) for cid in rng.permutation(plan[i])]
        plan[i].sort(key=lambda cid: order[group[cid]])
    return plan


def _plan_val(classes: list[BuiltinClass], num_images: int, rng: np.random.Generator):
    """Class-balanced validation images: every class equally likely in every slot."""
    ids = [c.id for c in classes]
    return [
        [int(c) for c in rng.choice(ids, size=int(np.clip(1 + rng.poisson(1.3), 1, 4)))]
        for _ in range(num_images)
    ]


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _split(
    classes: list[BuiltinClass],
    plan: list[list[int]],
    split: str,
    size: int,
    rng: np.random.Generator,
    out: Path,
) -> dict:
    images, annotations = [], []
    all_ids = {c.id for c in classes}
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for index, class_ids in enumerate(plan):
        image, instances = render_scene(classes, class_ids, size, rng)
        file_name = f"{split}/{index:06d}.png"
        _write_atomic(out / "images" / file_name, _encode_png(image))
        image_id = index + 1
        present = set()
        for cid, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [x, y, w, h],
                }
            )
            present.add(cid)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": size,
                "width": size,
                # Every object is annotated, so every absent class is a verified negative.
                "neg_category_ids": sorted(all_ids - present),
                "not_exhaustive_category_ids": [],
            }
        )
    return {"images": images, "annotations": annotations}


def write_builtin_dataset(
    out: str | Path,
    seed: int = 0,
    num_classes: int = 12,
    num_train_images: int = 600,
    num_val_images: int = 150,
    image_size: int = 128,
) -> Path:
    """Write the built-in set as an LVIS-format folder at ``out``; return the folder.

    ``image_count`` and ``instance_count`` are counted from the training split as LVIS does,
    and ``frequency`` is the LVIS group of ``image_count`` (:func:`lvis_frequency`). Files
    already in ``out`` are overwritten where the names match and otherwise kept (``bsgal
    data synth`` refuses a non-empty folder unless ``--force``, see
    :func:`remove_builtin_dataset`).

    Raises:
        DatasetSizeError: a size below its minimum (:func:`check_builtin_sizes`), before any
            file is written.
    """
    check_builtin_sizes(num_classes, num_train_images, num_val_images, image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = builtin_classes(num_classes)
    rng = np.random.default_rng(seed)
    train = _split(classes, _plan_train(classes, num_train_images, rng), "train", image_size,
                   rng, out)
    val = _split(classes, _plan_val(classes, num_val_images, rng), "val", image_size, rng, out)
    image_count = {c.id: set() for c in classes}
    instance_count = {c.id: 0 for c in classes}
    for ann in train["annotations"]:
        image_count[ann["category_id"]].add(ann["image_id"])
        instance_count[ann["category_id"]] += 1
    lost = [c.name for c in classes if not image_count[c.id]]
    if lost:  # every object of the class was hidden by others: no LVIS group fits
        raise ValueError(f"seed {seed}: no training image kept an object of {', '.join(lost)} "
                         f"(occluded); use more training images, a larger image_size or "
                         "another seed")
    categories = [
        {
            "id": c.id,
            "name": c.name,
            "synonyms": [c.name, c.name.replace("_", " ")],
            "def": c.look.describe(),
            "synset": f"{c.name}.n.01",
            "frequency": lvis_frequency(len(image_count[c.id])),
            "image_count": len(image_count[c.id]),
            "instance_count": instance_count[c.id],
            "look": c.look.to_dict(),
        }
        for c in classes
    ]
    info = {
        "description": "bsgal built-in long-tailed instance segmentation set",
        "seed": seed,
        "num_classes": num_classes,
        "image_size": image_size,
    }
    for name, split in (("train.json", train), ("val.json", val)):
        doc = {"info": info, "licenses": [], "categories": categories, **split}
        _write_atomic(out / name, json.dumps(doc, separators=(",", ":")).encode())
    return out


def builtin_dataset_files(out: str | Path) -> list[Path]:
    """The files of a built-in set in ``out`` (what :func:`write_builtin_dataset` writes:
    ``train.json``, ``val.json``, ``images/{train,val}/NNNNNN.png``, and the ``.tmp`` files of
    an interrupted write); nothing else."""
    out = Path(out)
    found = [out / name for name in ("train.json", "val.json", "train.json.tmp",
                                     "val.json.tmp") if (out / name).is_file()]
    for split in ("train", "val"):
        folder = out / "images" / split
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir()
                            if _IMAGE_FILE.fullmatch(p.name) and p.is_file())
    return found


def remove_builtin_dataset(out: str | Path) -> int:
    """Delete the files of a built-in set in ``out`` (:func:`builtin_dataset_files`) and the
    image folders they leave empty; other files stay. Returns how many files were deleted."""
    out = Path(out)
    files = builtin_dataset_files(out)
    for path in files:
        path.unlink()
    for folder in (out / "images" / "train", out / "images" / "val", out / "images"):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return len(files)

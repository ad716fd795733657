"""The built-in long-tailed instance-segmentation set: the embedded default's real data.

Procedural 128 x 128 scenes with 1-4 objects each, ``num_classes`` classes whose looks come from
:mod:`generators.looks`, split into LVIS frequency groups by how many training images contain
them: frequent (> 100 images at the default size), common (11-100) and rare (2-6, like LVIS's
1-10). The validation split is class-balanced so that APr can be measured. Everything is written
as an LVIS-format folder that the official ``lvis`` package loads::

    OUT/train.json  OUT/val.json  OUT/images/train/000000.png  OUT/images/val/000000.png

Deterministic: the same arguments write byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
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


@dataclass(frozen=True)
class BuiltinClass:
    """One class of the built-in set: LVIS category fields plus its look."""

    id: int
    name: str
    group: str  # planned LVIS frequency group: "f", "c" or "r"
    look: ObjectLook


def builtin_classes(num_classes: int) -> list[BuiltinClass]:
    """The class catalogue: ids 1..K, names from the look, groups f/c/r in turn."""
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 (one per frequency group), got {num_classes}")
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
        if len(free) < count:
            raise ValueError(
                f"num_train_images={num_images} is too small for the planned class counts; "
                "use at least 200"
            )
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

    ``frequency`` of each category is its planned group; ``image_count`` and
    ``instance_count`` are counted from the training split as LVIS does.
    """
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
    categories = [
        {
            "id": c.id,
            "name": c.name,
            "synonyms": [c.name, c.name.replace("_", " ")],
            "def": c.look.describe(),
            "synset": f"{c.name}.n.01",
            "frequency": c.group,
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

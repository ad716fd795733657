"""LVIS-format instance-segmentation data from a local folder or ``s3://`` (fsspec).

A split is one annotation JSON (LVIS v1 or the built-in set's) plus an image folder::

    ds = LvisDataset("s3://bucket/lvis", "lvis_v1_train.json", image_dir="coco")
    sample = ds[0]   # {"image": H x W x 3 uint8, "boxes": N x 4, "labels": N, "masks": N x H x W}

Bad input raises :class:`DatasetFormatError` naming the file and the field.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError

FREQUENCY_GROUPS = ("r", "c", "f")


class DatasetFormatError(ValueError):
    """A dataset file is missing, malformed or lacks a field; the message names both."""


def join_uri(root: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL-like URI (``s3://...``)."""
    if "://" in root:
        return posixpath.join(root, *parts)
    import os

    return os.path.join(root, *parts)


def read_json(uri: str, storage_options: dict | None = None) -> Any:
    """Load JSON from a local path or fsspec URI; errors name the file."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DatasetFormatError(f"{uri}: file not found") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{uri}: not valid JSON ({exc})") from None


def _require(record: dict, keys: tuple[str, ...], what: str, source: str) -> None:
    for key in keys:
        if key not in record:
            ident = f" id={record['id']}" if "id" in record else ""
            raise DatasetFormatError(f"{source}: {what}{ident} has no field '{key}'")


def validate_lvis_json(data: Any, source: str) -> None:
    """Check the fields that loading and the official LVIS evaluator need."""
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{source}: top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetFormatError(f"{source}: missing top-level field '{key}'")
        if not isinstance(data[key], list):
            raise DatasetFormatError(f"{source}: field '{key}' must be a list")
    cat_ids = set()
    for cat in data["categories"]:
        _require(cat, ("id", "name", "frequency"), "category", source)
        if cat["frequency"] not in FREQUENCY_GROUPS:
            raise DatasetFormatError(
                f"{source}: category id={cat['id']} field 'frequency' is {cat['frequency']!r}; "
                "expected 'r', 'c' or 'f'"
            )
        cat_ids.add(cat["id"])
    image_ids = set()
    for img in data["images"]:
        _require(img, ("id", "height", "width", "neg_category_ids",
                       "not_exhaustive_category_ids"), "image", source)
        image_ids.add(img["id"])
    for ann in data["annotations"]:
        _require(ann, ("id", "image_id", "category_id", "bbox", "segmentation", "area"),
                 "annotation", source)
        if ann["category_id"] not in cat_ids:
            raise DatasetFormatError(
                f"{source}: annotation id={ann['id']} field 'category_id' is "
                f"{ann['category_id']}, which is not a category of this file"
            )
        if ann["image_id"] not in image_ids:
            raise DatasetFormatError(
                f"{source}: annotation id={ann['id']} field 'image_id' is {ann['image_id']}, "
                "which is not an image of this file"
            )


def load_lvis_json(uri: str, storage_options: dict | None = None) -> dict:
    """Read and validate an LVIS-format annotation file."""
    data = read_json(uri, storage_options)
    validate_lvis_json(data, uri)
    return data


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE → H x W bool mask."""
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects(segm, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


def image_relative_path(img: dict) -> str:
    """Where an image lies under the image folder: ``file_name``, else from ``coco_url``."""
    if "file_name" in img:
        return img["file_name"]
    if "coco_url" in img:
        # LVIS v1: http://images.cocodataset.org/train2017/000000391895.jpg → train2017/...
        return "/".join(img["coco_url"].split("/")[-2:])
    raise DatasetFormatError(f"image id={img['id']} has neither 'file_name' nor 'coco_url'")


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Encoded image bytes → H x W x 3 uint8 RGB; undecodable bytes name ``source``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{source}: image does not decode ({exc})") from None


@dataclass(frozen=True)
class CategoryInfo:
    """A category of the split, with its contiguous training label (1..K; 0 = background)."""

    id: int
    label: int
    name: str
    frequency: str
    synonyms: tuple[str, ...]
    definition: str
    image_count: int
    instance_count: int


class LvisDataset:
    """One split of an LVIS-format dataset: random access to images and their instances.

    Args:
        root: folder (local path or fsspec URI) holding the JSON and the image folder.
        json_name: annotation file name under ``root`` (or an absolute URI).
        image_dir: image folder under ``root`` (or an absolute URI).
        storage_options: fsspec options for remote roots.
        max_images: keep only the first ``max_images`` images (by id), for quick runs.
        bad_images: ``error`` (an image that does not load raises) or ``skip`` (readers that
            honour it, :class:`trainer.real_data.RealImages` and the evaluation, leave it
            out and record it in :attr:`skipped`, ``uri → reason``).
    """

    def __init__(
        self,
        root: str,
        json_name: str,
        image_dir: str = "images",
        storage_options: dict | None = None,
        max_images: int | None = None,
        bad_images: str = "error",
    ) -> None:
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images: {bad_images!r} is not 'error' or 'skip'")
        self.bad_images = bad_images
        self.skipped: dict[str, str] = {}
        self.root = str(root)
        self.json_uri = json_name if "://" in json_name else join_uri(self.root, json_name)
        self.image_root = image_dir if "://" in image_dir else join_uri(self.root, image_dir)
        self.storage_options = dict(storage_options or {})
        self.data = load_lvis_json(self.json_uri, self.storage_options)
        images = sorted(self.data["images"], key=lambda im: im["id"])
        if max_images is not None:
            images = images[:max_images]
        self.images = images
        kept = {im["id"] for im in images}
        self.anns_by_image: dict[int, list[dict]] = {im["id"]: [] for im in images}
        for ann in self.data["annotations"]:
            if ann["image_id"] in kept:
                self.anns_by_image[ann["image_id"]].append(ann)
        cats = sorted(self.data["categories"], key=lambda c: c["id"])
        self.categories = [
            CategoryInfo(
                id=c["id"],
                label=i + 1,
                name=c["name"],
                frequency=c["frequency"],
                synonyms=tuple(c.get("synonyms", [c["name"]])),
                definition=c.get("def", ""),
                image_count=int(c.get("image_count", 0)),
                instance_count=int(c.get("instance_count", 0)),
            )
            for i, c in enumerate(cats)
        ]
        self.cat_by_id = {c.id: c for c in self.categories}
        self.cat_by_label = {c.label: c for c in self.categories}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def subset(self, image_ids: list[int] | set[int]) -> dict:
        """The annotation JSON restricted to ``image_ids`` (e.g. for evaluation)."""
        keep = set(image_ids)
        return {
            **{k: v for k, v in self.data.items() if k not in ("images", "annotations")},
            "images": [im for im in self.data["images"] if im["id"] in keep],
            "annotations": [a for a in self.data["annotations"] if a["image_id"] in keep],
        }

    def image_uri(self, index: int) -> str:
        return join_uri(self.image_root, image_relative_path(self.images[index]))

    def load_image(self, index: int) -> np.ndarray:
        """H x W x 3 uint8 RGB of image ``index``; errors name the file."""
        uri = self.image_uri(index)
        try:
            with fsspec.open(uri, "rb", **self.storage_options) as fh:
                data = fh.read()
        except FileNotFoundError:
            raise DatasetFormatError(f"{uri}: image file not found") from None
        image = decode_image(data, uri)
        img = self.images[index]
        if image.shape[:2] != (img["height"], img["width"]):
            raise DatasetFormatError(
                f"{uri}: image is {image.shape[1]}x{image.shape[0]} but {self.json_uri} says "
                f"width={img['width']} height={img['height']}"
            )
        return image

    def instances(self, index: int) -> dict[str, np.ndarray]:
        """Instances of image ``index``.

        Returns ``boxes`` N x 4 float32 XYXY in pixels, ``labels`` N int64 (contiguous, 1..K),
        ``category_ids`` N int64, ``masks`` N x H x W bool.
        """
        img = self.images[index]
        h, w = img["height"], img["width"]
        anns = self.anns_by_image[img["id"]]
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        masks = np.zeros((len(anns), h, w), dtype=bool)
        for i, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            boxes[i] = (x, y, x + bw, y + bh)
            try:
                masks[i] = decode_segmentation(ann["segmentation"], h, w)
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetFormatError(
                    f"{self.json_uri}: annotation id={ann['id']} field 'segmentation' does not "
                    f"decode ({exc})"
                ) from None
        cat_ids = np.array([a["category_id"] for a in anns], dtype=np.int64)
        labels = np.array([self.cat_by_id[c].label for c in cat_ids], dtype=np.int64)
        return {"boxes": boxes, "labels": labels, "category_ids": cat_ids, "masks": masks}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image_id": self.images[index]["id"],
            "image": self.load_image(index),
            **self.instances(index),
        }

    def load_or_skip(self, index: int) -> dict[str, Any] | None:
        """``self[index]``, or None (recorded in :attr:`skipped`) when it does not load and
        the policy is ``skip``."""
        try:
            return self[index]
        except DatasetFormatError as exc:
            if self.bad_images != "skip":
                raise
            self.skipped[self.image_uri(index)] = str(exc)
            return None

    def category_ids_per_image(self) -> list[set[int]]:
        """Set of category ids present in each image, by index."""
        return [{a["category_id"] for a in self.anns_by_image[im["id"]]} for im in self.images]

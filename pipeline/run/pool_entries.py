"""Opening one pool entry as an RGBA cut-out, in the three X-Paste forms or as a shard row.

An entry reference (:mod:`pipeline.storage.pool_index`) is one of:

- ``*PATH``: a ready RGBA cut-out; the mask is ``alpha > 128``;
- ``IMG|MASK``: an image and a greyscale mask of the same size; the mask is ``grey > 128``;
- ``PATH``: an RGBA image, thresholded at ``alpha > 128`` and reduced to its largest
  8-connected part (X-Paste's loader does the same);
- ``shard:URI#ROW``: row ``ROW`` of a decision shard (its ``image_png`` and ``mask_rle``);
- ``image:PATH``: a plain image that still needs a mask (:meth:`EntryReader.plain_image`; the
  run's annotator cuts it out).

Every form gives ``(rgba h x w x 4 uint8, mask h x w bool)`` cropped to the mask's box.
Problems raise :class:`EntryError` whose ``status`` is the candidate status to record:
``invalid_pool_missing`` (no such file: the message names it and the key that rewrites
paths) or ``invalid_pool_entry`` (not an image, no alpha, sizes differ, empty mask).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from annotators.components import largest_component
from annotators.cutout import mask_box, rgba_cutout
from generators.columns import INVALID_POOL_ENTRY, INVALID_POOL_MISSING
from pipeline.storage.filesystem import filesystem
from pipeline.storage.pool_index import ESCAPING_REF, IMAGE_REF, SHARD_REF
from pipeline.storage.shard_schema import decode_rle

ALPHA_THRESHOLD = 128
MISSING_FIX = ("fix the pool's paths or map them with generation.pool_path_map "
               "({old prefix: new prefix})")


class EntryError(ValueError):
    """One pool entry cannot be used; ``status`` is the ``invalid_pool_*`` status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class EntryReader:
    """Opens entry references; keeps the last shard file's media columns (a batch's draws
    from one shard file read it once).

    Args:
        storage_options: fsspec options for ``s3://`` paths (``endpoint_url``, ...).
    """

    def __init__(self, storage_options: dict | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self._shard: tuple[str, Any] | None = None

    def read_bytes(self, path: str) -> bytes:
        if path.startswith(ESCAPING_REF):
            raise EntryError(INVALID_POOL_ENTRY,
                             f"{path[len(ESCAPING_REF):]}: a relative entry path that leaves "
                             "the pool's folder is not followed; give it as an absolute path "
                             "or map it with generation.pool_path_map")
        try:
            fs, inner = filesystem(path, self.storage_options)
            with fs.open(inner, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise EntryError(INVALID_POOL_MISSING, f"{path}: no such file; {MISSING_FIX}") \
                from None

    def image(self, path: str) -> np.ndarray:
        """The file as an array: H x W x 4 for RGBA/LA/P-with-transparency, else H x W x 3,
        or H x W for a greyscale file."""
        data = self.read_bytes(path)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode in ("L", "I;16", "I", "F", "1"):
                    return np.asarray(img.convert("L"))
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    return np.asarray(img.convert("RGBA"))
                return np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise EntryError(INVALID_POOL_ENTRY, f"{path}: not a readable image ({exc})") \
                from None

    def plain_image(self, ref: str) -> np.ndarray:
        """The RGB pixels (H x W x 3 uint8) of an ``image:PATH`` reference; transparency is
        composited onto white."""
        path = ref[len(IMAGE_REF):]
        arr = self.image(path)
        if arr.ndim == 2:
            return np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[2] == 4:
            alpha = arr[..., 3:4].astype(np.float32) / 255.0
            return np.rint(arr[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])

    def read(self, ref: str) -> tuple[np.ndarray, np.ndarray]:
        """``(rgba, mask)`` of an entry reference (module docstring)."""
        if ref.startswith(SHARD_REF):
            return self._shard_row(ref[len(SHARD_REF):])
        if ref.startswith("*"):
            path = ref[1:]
            rgba = self._rgba(path, "'*PATH' entries are RGBA cut-outs")
            return _cropped(rgba[..., :3], rgba[..., 3] > ALPHA_THRESHOLD, path)
        if "|" in ref:
            image_path, _, mask_path = ref.partition("|")
            image = self.image(image_path)
            grey = self.image(mask_path)
            if grey.ndim == 3:
                grey = grey[..., 3] if grey.shape[2] == 4 else grey.mean(axis=2)
            rgb = image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, 2)
            if rgb.shape[:2] != grey.shape:
                raise EntryError(INVALID_POOL_ENTRY,
                                 f"{mask_path}: mask is {grey.shape[1]} x {grey.shape[0]} px, "
                                 f"image {image_path} {rgb.shape[1]} x {rgb.shape[0]}")
            return _cropped(rgb, grey > ALPHA_THRESHOLD, mask_path)
        rgba = self._rgba(ref, "'PATH' entries are RGBA images to threshold")
        mask, _ = largest_component(rgba[..., 3] > ALPHA_THRESHOLD)
        return _cropped(rgba[..., :3], mask, ref)

    def _rgba(self, path: str, form: str) -> np.ndarray:
        arr = self.image(path)
        if arr.ndim != 3 or arr.shape[2] != 4:
            raise EntryError(INVALID_POOL_ENTRY,
                             f"{path}: has no alpha channel; {form} (an image without alpha "
                             "needs the 'IMG|MASK' form)")
        return arr

    def _shard_row(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        uri, _, row = where.rpartition("#")
        table = self._shard_table(uri)
        rec = {c: table.column(c)[int(row)].as_py() for c in ("image_png", "mask_rle")}
        if not rec["image_png"] or not rec["mask_rle"]:
            raise EntryError(INVALID_POOL_ENTRY, f"{uri} row {row}: the decision row has no "
                             "image or no mask (it cannot be a pool entry)")
        try:
            with Image.open(io.BytesIO(rec["image_png"])) as img:
                rgb = np.asarray(img.convert("RGB"))
            mask = decode_rle(rec["mask_rle"])
        except (UnidentifiedImageError, OSError, ValueError, KeyError) as exc:
            raise EntryError(INVALID_POOL_ENTRY, f"{uri} row {row}: image or mask does not "
                             f"decode ({exc})") from None
        if mask.shape != rgb.shape[:2]:
            raise EntryError(INVALID_POOL_ENTRY, f"{uri} row {row}: mask {mask.shape} and "
                             f"image {rgb.shape[:2]} differ in size")
        return _cropped(rgb, mask, f"{uri} row {row}")

    def _shard_table(self, uri: str) -> Any:
        if self._shard is None or self._shard[0] != uri:
            import pyarrow.parquet as pq

            fs, inner = filesystem(uri, self.storage_options)
            try:
                table = pq.read_table(inner, filesystem=fs, columns=["image_png", "mask_rle"])
            except FileNotFoundError:
                raise EntryError(INVALID_POOL_MISSING, f"{uri}: the shard file is gone (the "
                                 "run was changed after the pool was indexed)") from None
            self._shard = (uri, table)
        return self._shard[1]


def _cropped(rgb: np.ndarray, mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """RGBA and mask cropped to the mask's box; EntryError for an empty mask."""
    if not mask.any():
        raise EntryError(INVALID_POOL_ENTRY, f"{where}: the mask is empty (no pixel above "
                         f"{ALPHA_THRESHOLD})")
    x0, y0, x1, y1 = mask_box(mask)
    return rgba_cutout(np.ascontiguousarray(rgb[..., :3]), mask), mask[y0:y1, x0:x1].copy()

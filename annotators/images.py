"""Reading one row's image out of a batch, turning anything unusable into :class:`ImageError`."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from annotators.columns import IMAGE


class ImageError(ValueError):
    """A row's image is absent, undecodable or not an RGB uint8 picture."""


def as_rgb_image(value: object) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from an array (RGB, RGBA or grey) or encoded bytes.

    Raises:
        ImageError: absent (None / empty), corrupt bytes, wrong dtype or shape.
    """
    if value is None:
        raise ImageError("image is absent (None)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ImageError("image bytes are empty")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(bytes(value))) as img:
                value = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"image bytes cannot be decoded ({exc})") from None
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ImageError(f"image has object dtype (shape {arr.shape}); expected uint8 pixels")
    if arr.dtype != np.uint8:
        raise ImageError(f"image dtype is {arr.dtype}; expected uint8 RGB in [0, 255]")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"image shape is {arr.shape}; expected H x W x 3 (RGB)")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"image is {arr.shape[0]} x {arr.shape[1]} px; too small to annotate")
    return np.ascontiguousarray(arr[..., :3])


def read_row_image(batch: Mapping[str, np.ndarray], i: int) -> np.ndarray:
    """The image of row ``i`` (see :func:`as_rgb_image`)."""
    return as_rgb_image(batch[IMAGE][i])

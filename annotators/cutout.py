"""RGBA cut-outs: the object's pixels cropped to its mask's box, the pool format of X-Paste."""

from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` of a non-empty bool mask, end-exclusive, in pixels."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        raise ValueError("mask is empty; an empty mask has no cut-out")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def rgba_cutout(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object as an h x w x 4 uint8 RGBA array cropped to the mask's box.

    Args:
        image: H x W x 3 uint8 RGB.
        mask: H x W bool, the object's pixels (alpha 255 there, 0 elsewhere).
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    x0, y0, x1, y1 = mask_box(mask)
    crop = image[y0:y1, x0:x1, :3]
    alpha = np.where(mask[y0:y1, x0:x1], 255, 0).astype(np.uint8)
    return np.concatenate([crop, alpha[..., None]], axis=2)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """An RGBA cut-out over a white background, h x w x 3 uint8 (what CLIP is shown)."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)

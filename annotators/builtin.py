"""The built-in classical annotator: the object is what differs from the plain background.

For generated images of one object on a plain background (the built-in generator's, or SD's
"... in a white background"): estimate the background colour from the image border, mark the
pixels that differ from it by more than a threshold, and keep the largest connected component.
No model, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from annotators.components import EIGHT_CONNECTED, largest_component
from annotators.stage import Annotation, MaskAnnotator
from generators.backends import options

VERSION = 1


class BuiltinAnnotator(MaskAnnotator):
    """Ray Data stage: mask the object on a plain background by thresholding + largest component.

    Args:
        threshold: a pixel is foreground when one of its channels differs from the background
            colour by more than this (uint8 levels).
        border: width in pixels of the image frame whose median colour is the background.

    ``mask_score`` in [0, 1] is ``purity * solidity``: purity is the share of all foreground
    pixels that lie in the kept component (low for clutter); solidity is the share of the kept
    component's pixels whose 3 x 3 neighbourhood is entirely in it (near 1 for a solid object,
    low for the speckled masks of noisy images).
    ``num_components`` counts the components of the thresholded mask before the largest is kept.
    """

    reports_components = True

    def __init__(self, *, threshold: float = 40.0, border: int = 2) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if border < 1:
            raise ValueError(f"border must be >= 1 px, got {border}")
        self.threshold = float(threshold)
        self.border = int(border)
        self.version = f"builtin@{VERSION}"

    def difference(self, image: np.ndarray) -> np.ndarray:
        """Per-pixel largest channel difference from the background colour, float32 H x W."""
        b = min(self.border, image.shape[0] // 2, image.shape[1] // 2)
        frame = np.concatenate(
            [
                image[:b].reshape(-1, 3),
                image[-b:].reshape(-1, 3),
                image[:, :b].reshape(-1, 3),
                image[:, -b:].reshape(-1, 3),
            ]
        )
        background = np.median(frame, axis=0).astype(np.float32)
        return np.abs(image.astype(np.float32) - background).max(axis=2)

    def annotate(self, image: np.ndarray) -> Annotation:
        """Annotate one H x W x 3 uint8 image."""
        diff = self.difference(image)
        raw = diff > self.threshold
        mask, count = largest_component(raw)
        total = int(raw.sum())
        if total == 0:
            return Annotation(mask, 0.0, count)
        kept = float(mask.sum())
        purity = kept / total
        interior = ndimage.binary_erosion(mask, structure=EIGHT_CONNECTED, border_value=1)
        return Annotation(mask, purity * float(interior.sum()) / kept, count)

    def annotate_images(self, images: Sequence[np.ndarray]) -> list[Annotation | BaseException]:
        out: list[Annotation | BaseException] = []
        for image in images:
            try:
                out.append(self.annotate(image))
            except Exception as exc:  # one bad image must not kill the batch
                out.append(exc)
        return out


# ------------------------------------------------------------------ the backend (annotators)

STAGE = BuiltinAnnotator
#: The annotator's own settings, given in ``annotation.options`` (defaults as above).
OPTIONS = ("threshold", "border")


def build(section: Mapping[str, Any]) -> BuiltinAnnotator:
    """The stage from the ``annotation`` section (its ``options``: ``threshold``,
    ``border``)."""
    own = {k: v for k, v in options(section).items() if k in OPTIONS}
    return BuiltinAnnotator(**own)

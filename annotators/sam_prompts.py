"""Prompts that tell SAM where the object of a generated "single object" image is.

Generated images of one object on a plain background need no detector: the prompt follows from
the image frame.

- ``corners`` (DiverGen): the four corner pixels as positive points select the *background*;
  the chosen mask is then inverted to give the object.
- ``box``: a centred box covering the image minus a margin.
- ``point``: the image centre as one positive point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPTS = ("corners", "box", "point")


@dataclass(frozen=True)
class SamPrompt:
    """One image's prompt in original pixel coordinates.

    Attributes:
        points: N x 2 float (x, y) or None.
        labels: N int (1 = foreground, 0 = background) or None.
        box: 4 float XYXY or None.
        invert: the prompt selects the background; invert the predicted mask.
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None
    invert: bool


def make_prompt(strategy: str, height: int, width: int, box_margin: float = 0.05) -> SamPrompt:
    """The prompt of ``strategy`` for an image of ``height`` x ``width`` pixels."""
    if strategy == "corners":
        points = np.array(
            [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], dtype=np.float32
        )
        return SamPrompt(points, np.ones(4, dtype=np.int64), None, invert=True)
    if strategy == "box":
        mx, my = box_margin * width, box_margin * height
        box = np.array([mx, my, width - 1 - mx, height - 1 - my], dtype=np.float32)
        return SamPrompt(None, None, box, invert=False)
    if strategy == "point":
        centre = np.array([[(width - 1) / 2, (height - 1) / 2]], dtype=np.float32)
        return SamPrompt(centre, np.ones(1, dtype=np.int64), None, invert=False)
    raise ValueError(f"unknown SAM prompt strategy {strategy!r}; expected one of {PROMPTS}")

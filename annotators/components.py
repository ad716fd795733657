"""Connected components of masks (8-connectivity, scipy.ndimage)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: 8-connectivity: diagonal neighbours belong to the same component.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest 8-connected component of a bool H x W mask, and the number of components.

    An empty mask gives an empty mask and 0; ties go to the component with the lower label.
    """
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count <= 1:
        return mask.astype(bool, copy=True), int(count)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax()), int(count)

"""The pool's stage of the candidate stream: draw rows in, candidates (image + mask) out.

It takes the place of the generator and the annotator (a pool entry brings its own mask) and
is followed by the same quality checks. Each cut-out is placed on a white ``image_size`` x
``image_size`` canvas, scaled so that its longer side is ``fill`` x ``image_size`` (bilinear
for the pixels, nearest for the mask) and centred, so that pool candidates have the fixed size
and the white background of the online generators, and the area-ratio checks mean the same.

Input columns: the draw rows of :mod:`pipeline.run.pool_source` (``sample_id``, ``class_id``,
``class_name``, ``prompt``, ``seed``, ``generator`` (``pool:<format>@1``), ``source``,
``source_id``, ``pool_ref``, ``mask_score``, ``status``, ``error``). Output: those plus
``image`` uint8 [B, S, S, 3], ``mask`` bool [B, S, S], ``annotator`` (``pool-mask@1``: the
mask is the pool's), ``truth_failure`` ``""`` and ``truth_class_id`` -1 (a pool knows no truth).
An ``image:`` entry (an images pool) is a plain image: it is fitted into the canvas (longer side
S, white around it) with an empty mask, and the annotation stage that follows cuts it out.
A row whose entry cannot be used keeps flowing with ``invalid_pool_missing`` /
``invalid_pool_entry`` and the file in ``error``; a row that arrived invalid is passed on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from generators.columns import (
    ERROR,
    GENERATOR,
    IMAGE,
    INVALID_POOL_ENTRY,
    STATUS,
    STATUS_OK,
    TRUTH_CLASS_ID,
    TRUTH_FAILURE,
    batch_length,
    incoming_status,
    require_columns,
    short_error,
    string_column,
)
from pipeline.run.pool_entries import EntryError, EntryReader
from pipeline.storage.pool_index import IMAGE_REF

POOL_REF = "pool_ref"
MASK = "mask"
ANNOTATOR = "annotator"
POOL_ANNOTATOR = "pool-mask@1"
POOL_GENERATOR = "pool@1"
INPUT_COLUMNS = ("sample_id", "class_id", POOL_REF)


def place_on_canvas(rgba: np.ndarray, mask: np.ndarray, size: int, fill: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A cut-out (h x w x 4 uint8, h x w bool) centred on a white ``size`` x ``size``
    canvas, longer side ``round(fill * size)`` px: (size x size x 3 uint8, size x size bool).
    Pixels outside the mask are white."""
    h, w = mask.shape
    scale = fill * size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgba[..., :3])).resize(
        (nw, nh), Image.BILINEAR))
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (nw, nh), Image.NEAREST)) > 127
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    canvas_mask = np.zeros((size, size), dtype=bool)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    image[y0:y0 + nh, x0:x0 + nw][small] = rgb[small]
    canvas_mask[y0:y0 + nh, x0:x0 + nw] = small
    return image, canvas_mask


class PoolReader:
    """Ray Data stage (and plain callable) that opens the pool entries of draw rows.

    Args:
        image_size: canvas side S (px).
        fill: longer side of the placed cut-out as a fraction of S, in (0, 1].
        storage_options: fsspec options for ``s3://`` entries.
    """

    def __init__(self, image_size: int = 128, fill: float = 0.8,
                 storage_options: dict | None = None) -> None:
        self.size, self.fill = int(image_size), float(fill)
        self.reader = EntryReader(storage_options)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, INPUT_COLUMNS, "the pool reader")
        n = batch_length(batch)
        status, error = incoming_status(batch, n)
        images = np.full((n, self.size, self.size, 3), 255, dtype=np.uint8)
        masks = np.zeros((n, self.size, self.size), dtype=bool)
        for i in range(n):
            if status[i] != STATUS_OK:
                continue
            ref = str(batch[POOL_REF][i])
            try:
                if ref.startswith(IMAGE_REF):
                    rgb = self.reader.plain_image(ref)
                    full = np.ones(rgb.shape[:2], dtype=bool)
                    images[i], _ = place_on_canvas(np.dstack([rgb, full * 255]).astype(
                        np.uint8), full, self.size, 1.0)
                    continue
                rgba, mask = self.reader.read(ref)
                images[i], masks[i] = place_on_canvas(rgba, mask, self.size, self.fill)
            except EntryError as exc:
                status[i], error[i] = exc.status, str(exc)[:300]
            except Exception as exc:  # a bad row never ends the stream
                status[i], error[i] = INVALID_POOL_ENTRY, short_error(exc)
        out = {k: v for k, v in batch.items()}
        if GENERATOR not in out:
            out[GENERATOR] = string_column([POOL_GENERATOR] * n)
        out.update({IMAGE: images, MASK: masks,
                    ANNOTATOR: string_column([POOL_ANNOTATOR] * n),
                    TRUTH_FAILURE: string_column([""] * n),
                    TRUTH_CLASS_ID: np.full(n, -1, dtype=np.int64),
                    STATUS: status, ERROR: error})
        return out

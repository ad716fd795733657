"""The shared batch logic of annotators: read images, annotate the valid rows, write columns.

A concrete annotator implements :meth:`MaskAnnotator.annotate_images` (a list of images in, one
:class:`Annotation` or exception per image out); :meth:`MaskAnnotator.__call__` turns that into
the ``mask``, ``annotator``, ``mask_score`` (and ``num_components``) columns, with
``invalid_image`` / ``invalid_annotation_error`` rows instead of exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from annotators.columns import (
    ANNOTATOR,
    ERROR,
    IMAGE,
    INVALID_ANNOTATION_ERROR,
    INVALID_IMAGE,
    MASK,
    MASK_SCORE,
    NUM_COMPONENTS,
    STATUS,
    STATUS_OK,
    batch_length,
    incoming_status,
    mask_column,
    require_columns,
    short_error,
    string_column,
)
from annotators.images import ImageError, read_row_image


@dataclass(frozen=True)
class Annotation:
    """One image's annotation.

    Attributes:
        mask: H x W bool, the object's pixels (same H, W as the image).
        score: confidence in [0, 1].
        num_components: connected components of the raw mask, if the annotator knows them.
    """

    mask: np.ndarray
    score: float
    num_components: int | None = None


class MaskAnnotator:
    """Base of annotation stages: subclasses set ``version`` and implement ``annotate_images``.

    Input columns: ``image`` (uint8 B x H x W x 3, or an object column of arrays / encoded
    bytes) and optionally ``status``/``error``; rows whose status is not "ok" are passed through
    unannotated (all-false mask, score 0). Output adds ``mask`` (bool B x H x W),
    ``annotator``, ``mask_score`` (float32), ``num_components`` (int32, -1 when unknown, if the
    annotator reports components), ``status`` and ``error``.
    """

    version = "annotator@0"
    reports_components = False

    def annotate_images(
        self, images: Sequence[np.ndarray]
    ) -> list[Annotation | BaseException]:
        """One :class:`Annotation` (or the exception that stopped it) per H x W x 3 uint8 image."""
        raise NotImplementedError

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, (IMAGE,), type(self).__name__)
        n = batch_length(batch)
        status, error = incoming_status(batch, n)
        images: dict[int, np.ndarray] = {}
        shapes: list[tuple[int, int] | None] = [None] * n
        for i in range(n):
            try:
                image = read_row_image(batch, i)
            except ImageError as exc:
                if status[i] == STATUS_OK:
                    status[i], error[i] = INVALID_IMAGE, str(exc)
                continue
            shapes[i] = image.shape[:2]
            if status[i] == STATUS_OK:
                images[i] = image
        masks: list[np.ndarray | None] = [None] * n
        scores = np.zeros(n, dtype=np.float32)
        components = np.full(n, -1, dtype=np.int32)
        rows = list(images)
        results = self.annotate_images([images[i] for i in rows]) if rows else []
        for i, result in zip(rows, results):
            if isinstance(result, BaseException):
                status[i], error[i] = INVALID_ANNOTATION_ERROR, short_error(result)
                continue
            mask = np.asarray(result.mask)
            if mask.shape != shapes[i]:
                status[i] = INVALID_ANNOTATION_ERROR
                error[i] = f"annotator returned a {mask.shape} mask for a {shapes[i]} image"
                continue
            masks[i] = mask.astype(bool, copy=False)
            score = float(result.score)
            scores[i] = min(max(score, 0.0), 1.0) if np.isfinite(score) else 0.0
            if result.num_components is not None:
                components[i] = result.num_components
        out = dict(batch)
        out[MASK] = mask_column(masks, shapes)
        out[ANNOTATOR] = string_column([self.version] * n)
        out[MASK_SCORE] = scores
        if self.reports_components:
            out[NUM_COMPONENTS] = components
        out[STATUS] = status
        out[ERROR] = error
        return out

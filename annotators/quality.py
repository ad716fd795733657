"""Mask quality checks with X-Paste's defaults, as a Ray Data stage.

For each row that is still "ok", in this order:

1. the mask must exist (``invalid_missing_mask``) and, for float masks, hold no NaN
   (``invalid_nan_mask``; float masks are then thresholded at 0.5);
2. it must have the image's H x W (``invalid_size_mismatch``);
3. it must not be empty (``invalid_empty_mask``);
4. only its largest 8-connected component is kept (``largest_component=True``, X-Paste);
5. the checks of :mod:`annotators.checks`, in their order: its area ratio must lie in
   [``min_area_ratio``, ``max_area_ratio``] (X-Paste: [0.05, 0.95]; ``invalid_area_ratio``);
   optionally it must not touch the image border (``invalid_border_touch``); and any check
   registered there.

Rows that fail become ``invalid_<check>`` with a message in ``error``; none raises, none is
dropped. Optionally the CLIP score of the cut-out against "a photo of a single {name}" is added
(``clip_score``; NaN when not computed) for the CLIP-filter baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotators.checks import check_fields, check_settings, mask_checks
from annotators.columns import (
    CLASS_NAME,
    CLIP_SCORE,
    ERROR,
    IMAGE,
    INVALID_EMPTY_MASK,
    INVALID_IMAGE,
    INVALID_MISSING_MASK,
    INVALID_NAN_MASK,
    INVALID_QUALITY_ERROR,
    INVALID_SIZE_MISMATCH,
    MASK,
    NUM_COMPONENTS,
    STATUS,
    STATUS_OK,
    batch_length,
    incoming_status,
    mask_column,
    require_columns,
    short_error,
)
from annotators.components import largest_component
from annotators.cutout import composite_on_white, rgba_cutout
from annotators.images import ImageError, read_row_image

#: X-Paste's CLIP prompt.
CLIP_TEMPLATE = "a photo of a single {name}"


class MaskCheckError(ValueError):
    """A mask failed a check; ``reason`` is the ``invalid_*`` status to record."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.fields: dict[str, float] = {}
        self.num_components = -1

    def with_fields(self, fields: Mapping[str, float], num_components: int) -> "MaskCheckError":
        """Attach what was measured before the check failed (reported on the row)."""
        self.fields = dict(fields)
        self.num_components = int(num_components)
        return self


@dataclass(frozen=True)
class CheckedMask:
    """A mask that passed: the kept mask (bool H x W), the checks' fields (``area_ratio``, ...)
    and the raw mask's component count."""

    mask: np.ndarray
    fields: dict[str, float]
    num_components: int

    @property
    def area_ratio(self) -> float:
        return self.fields["area_ratio"]


def as_bool_mask(value: object) -> np.ndarray:
    """A bool H x W mask from bool, integer or float (NaN-free, > 0.5) input."""
    if value is None:
        raise MaskCheckError(INVALID_MISSING_MASK, "mask is absent (None)")
    mask = np.asarray(value)
    if mask.dtype == object:
        raise MaskCheckError(INVALID_MISSING_MASK, f"mask has object dtype (shape {mask.shape})")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise MaskCheckError(INVALID_SIZE_MISMATCH, f"mask shape {mask.shape} is not H x W")
    if np.issubdtype(mask.dtype, np.floating):
        if np.isnan(mask).any():
            raise MaskCheckError(
                INVALID_NAN_MASK, f"mask has {int(np.isnan(mask).sum())} NaN value(s)"
            )
        return mask > 0.5
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise MaskCheckError(INVALID_MISSING_MASK, f"mask dtype {mask.dtype} is not bool/int/float")


class QualityCheck:
    """Ray Data stage: check each mask, keep its largest component, add the quality fields.

    Input columns: ``image``, ``mask`` (bool/int/float B x H x W, or an object column), and
    optionally ``status``/``error``, ``num_components`` (an annotator's raw count) and
    ``class_name`` (for the CLIP score).
    Output: ``mask`` (bool, largest component kept), the fields of the checks
    (:mod:`annotators.checks`; ``area_ratio``: float32, kept mask pixels / image pixels; NaN
    when not measured), ``num_components`` (int32, components of the raw mask; -1 when not
    measured), ``clip_score`` (float32, NaN when not computed), ``status``, ``error``.

    Args:
        min_area_ratio, max_area_ratio: accepted range of the kept mask's area ratio.
        largest_component: keep only the largest 8-connected component.
        reject_border_touch: reject masks that touch the image border.
        border_px: width of the border band for that check.
        clip_model: CLIP hub id or folder; when given, ``clip_score`` is computed for the rows
            that pass, on the cut-out composited over white.
        clip_template: text for the CLIP score, with ``{name}`` (class name, underscores as
            spaces).
        clip_device, clip_offline: passed to :class:`annotators.clip_score.ClipScorer`.
        **settings: the settings of checks registered beyond the built-in ones.
    """

    def __init__(
        self,
        *,
        min_area_ratio: float = 0.05,
        max_area_ratio: float = 0.95,
        largest_component: bool = True,
        reject_border_touch: bool = False,
        border_px: int = 1,
        clip_model: str | None = None,
        clip_template: str = CLIP_TEMPLATE,
        clip_device: str | None = None,
        clip_offline: bool | None = None,
        **settings: Any,
    ) -> None:
        if not 0.0 <= min_area_ratio < max_area_ratio <= 1.0:
            raise ValueError(
                f"need 0 <= min_area_ratio < max_area_ratio <= 1, got {min_area_ratio} and "
                f"{max_area_ratio}"
            )
        if border_px < 1:
            raise ValueError(f"border_px must be >= 1, got {border_px}")
        if "{name}" not in clip_template:
            raise ValueError(f"clip_template {clip_template!r} must contain {{name}}")
        given = {"min_area_ratio": float(min_area_ratio), "max_area_ratio": float(max_area_ratio),
                 "reject_border_touch": bool(reject_border_touch), "border_px": int(border_px),
                 **settings}
        self.settings = {**check_settings({}), **given}
        unknown = sorted(set(self.settings) - set(check_settings({})))
        if unknown:
            raise ValueError(f"unknown quality-check setting(s) {unknown}; the checks "
                             f"({[c.name for c in mask_checks()]}) read "
                             f"{sorted(check_settings({}))}")
        self.checks = [c for c in mask_checks() if c.enabled(self.settings)]
        self.fields = check_fields()
        self.min_area_ratio = float(min_area_ratio)
        self.max_area_ratio = float(max_area_ratio)
        self.largest_component = bool(largest_component)
        self.reject_border_touch = bool(reject_border_touch)
        self.border_px = int(border_px)
        self.clip_template = clip_template
        self.clip = None
        if clip_model is not None:
            from annotators.clip_score import ClipScorer

            self.clip = ClipScorer(clip_model, device=clip_device, offline=clip_offline)

    def check(
        self, image_shape: tuple[int, int], mask: object, num_components: int | None = None
    ) -> CheckedMask:
        """Run the checks on one mask; :class:`MaskCheckError` names the failed check."""
        m = as_bool_mask(mask)
        if m.shape != tuple(image_shape):
            raise MaskCheckError(
                INVALID_SIZE_MISMATCH,
                f"mask is {m.shape[0]} x {m.shape[1]} but the image is "
                f"{image_shape[0]} x {image_shape[1]}",
            )
        if not m.any():
            raise MaskCheckError(INVALID_EMPTY_MASK, "mask is empty").with_fields(
                {"area_ratio": 0.0}, 0)
        kept, count = largest_component(m)
        if not self.largest_component:
            kept = m
        if num_components is not None and num_components >= 0:
            count = int(num_components)
        fields: dict[str, float] = {}
        for c in self.checks:
            measured, problem = c.run(kept, self.settings)
            fields.update(measured)
            if problem is not None:
                raise MaskCheckError(c.reason, problem).with_fields(fields, count)
        return CheckedMask(kept, fields, count)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, (IMAGE, MASK), "QualityCheck")
        n = batch_length(batch)
        status, error = incoming_status(batch, n)
        given_components = batch.get(NUM_COMPONENTS)
        masks: list[np.ndarray | None] = [None] * n
        shapes: list[tuple[int, int] | None] = [None] * n
        measured = {name: np.full(n, np.nan, dtype=dtype) for name, dtype in self.fields.items()}
        components = np.full(n, -1, dtype=np.int32)
        clip = np.full(n, np.nan, dtype=np.float32)
        images: dict[int, np.ndarray] = {}
        for i in range(n):
            raw = batch[MASK][i]
            try:
                image = read_row_image(batch, i)
            except ImageError as exc:
                if status[i] == STATUS_OK:
                    status[i], error[i] = INVALID_IMAGE, str(exc)
                continue
            shapes[i] = image.shape[:2]
            if status[i] != STATUS_OK:
                masks[i] = _passthrough_mask(raw, shapes[i])
                continue
            known = None if given_components is None else int(given_components[i])
            try:
                checked = self.check(shapes[i], raw, known)
            except MaskCheckError as exc:
                status[i], error[i] = exc.reason, str(exc)
                _record(measured, i, exc.fields)
                components[i] = exc.num_components
                masks[i] = _passthrough_mask(raw, shapes[i])
                continue
            except Exception as exc:  # anything unforeseen stays on its row
                status[i], error[i] = INVALID_QUALITY_ERROR, short_error(exc)
                continue
            masks[i] = checked.mask
            _record(measured, i, checked.fields)
            components[i] = checked.num_components
            images[i] = image
        if self.clip is not None and images:
            clip_rows = list(images)
            self._clip_scores(batch, clip_rows, images, masks, clip, status, error)
        out = dict(batch)
        out[MASK] = mask_column(masks, shapes)
        out.update(measured)
        out[NUM_COMPONENTS] = components
        out[CLIP_SCORE] = clip
        out[STATUS] = status
        out[ERROR] = error
        return out

    def _clip_scores(self, batch, rows, images, masks, clip, status, error) -> None:
        names = batch.get(CLASS_NAME)
        if names is None:
            raise KeyError("QualityCheck with clip_model needs the 'class_name' column")
        crops = [composite_on_white(rgba_cutout(images[i], masks[i])) for i in rows]
        texts = [
            self.clip_template.format(name=str(names[i]).replace("_", " ").strip()) for i in rows
        ]
        try:
            scores = self.clip.score(crops, texts)
        except Exception as exc:  # a failing CLIP call leaves NaN scores, and says why
            for i in rows:
                error[i] = f"clip_score not computed: {short_error(exc, 200)}"
            return
        clip[rows] = scores


def _record(columns: dict[str, np.ndarray], i: int, fields: Mapping[str, float]) -> None:
    for name, value in fields.items():
        if name in columns:
            columns[name][i] = value


def build_quality_check(section: Mapping[str, Any]) -> QualityCheck:
    """The check stage from the ``annotation`` section: the registered checks' settings
    (:func:`annotators.checks.check_settings`), ``largest_component`` and the CLIP score
    (``clip_score``, ``clip_model``)."""
    return QualityCheck(largest_component=bool(section.get("largest_component", True)),
                        clip_model=section.get("clip_model") if section.get("clip_score")
                        else None, **check_settings(section))


def _passthrough_mask(raw: object, shape: tuple[int, int]) -> np.ndarray | None:
    """Bool copy of an invalid row's mask if it has the image's shape (else None: zeros)."""
    try:
        m = np.asarray(raw)
        if m.dtype == object or m.shape != tuple(shape):
            return None
        if np.issubdtype(m.dtype, np.floating):
            return np.nan_to_num(m, nan=0.0) > 0.5
        return m.astype(bool)
    except (TypeError, ValueError):
        return None

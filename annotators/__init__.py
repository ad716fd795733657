"""Mask annotation of generated images and mask quality checks: the second stages of the stream.

Every stage is a callable class (load in ``__init__``, transform one batch in ``__call__``) that
works in plain Python and as a Ray Data ``map_batches`` stage. A batch is a dict of equal-length
numpy columns; one row is one candidate. This package must not import Stable Diffusion code,
trainer or ray (it shares the plain batch helpers of ``generators.columns``).

Columns (docs/contracts.md, Candidate; names in :mod:`annotators.columns`)
--------------------------------------------------------------------------
Read: ``image`` uint8 [B, H, W, 3] (RGB; an object column of arrays or encoded PNG/JPEG bytes is
accepted too), ``status``/``error`` when present, ``class_name`` for the optional CLIP score.
Every other column passes through.

Added by an annotator (:class:`BuiltinAnnotator`, :class:`SamAnnotator`):

- ``mask`` bool [B, H, W]: the object's pixels (all false on invalid rows). A ragged batch
  (images of different sizes) gets a 1-D object column of H x W masks instead.
- ``annotator`` str: name + version/hash, e.g. ``"builtin@1"``, ``"sam:vit_h@1a2b3c4d"``.
- ``mask_score`` float32 in [0, 1]: SAM's predicted IoU; builtin: a purity x separation
  heuristic; 0 on invalid rows.
- ``num_components`` int32 (builtin only): components of the raw thresholded mask.

Added by :class:`QualityCheck` (X-Paste's defaults):

- ``mask`` replaced by its largest 8-connected component.
- ``area_ratio`` float32: mask pixels / image pixels (NaN when not measured).
- ``num_components`` int32: connected components of the raw mask, before keeping the largest
  (the annotator's count when it gave one; -1 when not measured).
- ``clip_score`` float32: CLIP cosine of the cut-out and "a photo of a single {name}"; NaN when
  not computed.

``status``/``error`` are updated: a row that fails becomes ``invalid_<why>`` with a message:
``invalid_image`` (absent/corrupt/non-RGB image), ``invalid_annotation_error``,
``invalid_missing_mask``, ``invalid_nan_mask``, ``invalid_size_mismatch``,
``invalid_empty_mask``, ``invalid_area_ratio``, ``invalid_border_touch``,
``invalid_quality_error``. An invalid row is never dropped and never raises; rows that arrive
invalid are passed through unchanged.
Stages never write into their input arrays, so ``map_batches(..., zero_copy_batch=True)``
is safe. Ray Data costs roughly 10-40 ms per batch on a small CPU machine
(``benchmarks/stages.py``): give cheap CPU stages batches of ~128 rows.

Backends
--------
:data:`ANNOTATORS` (a :class:`generators.backends.BackendRegistry`) holds the backends by name;
each backend module has its stage class, ``build(section)`` from the ``annotation`` config
section and the checks of the keys it reads. A new annotator is one new module with a
:class:`annotators.stage.MaskAnnotator` subclass and those functions, plus one line in
:data:`ANNOTATORS` (``ANNOTATORS.register`` from elsewhere reaches
only the process that calls it: a test, not a run's Ray actors).
"""

from __future__ import annotations

from generators.backends import BackendRegistry
from generators.columns import lazy_attribute

#: The annotator backends: name -> module (imported on use, so the builtin path never loads
#: torch).
ANNOTATORS = BackendRegistry("annotator", "annotation", {
    "builtin": "annotators.builtin",
    "sam": "annotators.sam",
})


def annotator_class(backend: str) -> type:
    """The stage class registered for ``backend``."""
    return ANNOTATORS.get(backend).STAGE


def build_annotator(backend: str, **kwargs):
    """Construct the annotator stage for ``backend`` with its keyword arguments."""
    return annotator_class(backend)(**kwargs)


def build_annotator_stage(backend: str, section):
    """The annotator stage of ``backend`` from the ``annotation`` section (a mapping)."""
    return ANNOTATORS.build(backend, section)


#: Lazy re-exports: importing the package must stay cheap (no torch, no segment-anything).
_LAZY = {
    "BuiltinAnnotator": "annotators.builtin",
    "SamAnnotator": "annotators.sam",
    "build_sam": "annotators.sam",
    "QualityCheck": "annotators.quality",
    "ClipScorer": "annotators.clip_score",
    "rgba_cutout": "annotators.cutout",
    "Annotation": "annotators.stage",
    "MaskAnnotator": "annotators.stage",
}


def __getattr__(name: str):
    return lazy_attribute("annotators", _LAZY, name)


__all__ = [
    "ANNOTATORS",
    "Annotation",
    "BuiltinAnnotator",
    "ClipScorer",
    "MaskAnnotator",
    "QualityCheck",
    "SamAnnotator",
    "annotator_class",
    "build_annotator",
    "build_annotator_stage",
    "build_sam",
    "rgba_cutout",
]

"""What the instance-level class caches will take, before any model is built.

The exact cache (``selection.cache_sketch: none``) is a copy of the scored parameters per class:
the box head and predictor (``score_parameters: heads``, box regression included), 4 bytes a
number (2 in bfloat16). The sketched cache (``input_basis``, `selector.class_sketch`) keeps
Σ_l (d_out r + d_out + d_in) numbers per class over the layers a classification loss reaches
(fc6, fc7, cls_score), plus one shared basis of Σ_l d_in r numbers. Sizes come from the arch
(`trainer.backends.torchvision_arch.BOX_HEAD_SIZES`; detectron2's R50-FPN head has the same).
``bsgal config show`` and ``bsgal check`` print it; ``bsgal check`` refuses a config whose caches
of every class of the data exceed ``selection.cache_memory_mb``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from selector.class_sketch import SketchedClassCaches
from trainer.backends.torchvision_arch import box_classifier_layers

MIB = 2 ** 20


@dataclass(frozen=True)
class CacheMemory:
    """The class caches of a config.

    Attributes:
        kind: ``"exact"`` or ``"sketch"``.
        per_class: bytes per class.
        shared: bytes held once (the sketch's input basis).
        classes: the classes counted.
        numbers_per_class: numbers stored per class.
    """

    kind: str
    per_class: int
    shared: int
    classes: int
    numbers_per_class: int

    @property
    def total(self) -> int:
        """Bytes for ``classes`` classes."""
        return self.per_class * self.classes + self.shared

    def describe(self) -> str:
        what = ("sketched, input basis" if self.kind == "sketch" else
                "exact: a copy of the scored parameters per class")
        return (f"class caches ({what}): {self.numbers_per_class:,} numbers = "
                f"{self.per_class / MIB:.3g} MiB per class, {_mib(self.total)} for "
                f"{self.classes} classes")


def _mib(n: int) -> str:
    mib = n / MIB
    return f"{mib / 1024:,.1f} GiB" if mib >= 1024 else f"{mib:,.1f} MiB"


def cache_memory(arch: str, num_classes: int, selection: Mapping[str, Any]
                 ) -> CacheMemory | None:
    """The class caches' memory under ``selection`` (a ``selection`` section as a mapping) for
    ``num_classes`` classes; None when the config keeps no class cache (batch granularity,
    or a method without the contribution signal)."""
    from selector.methods import selection_method

    if selection.get("granularity") != "instance":
        return None
    spec = selection_method("instance", selection["method"])
    if spec.signal != "contribution":
        return None
    layers = box_classifier_layers(arch, num_classes)
    width = 2 if selection.get("cache_dtype") == "bfloat16" else 4
    if selection.get("cache_sketch", "none") == "input_basis":
        rank = int(selection["sketch_rank"])
        scored = [(d_in, d_out) for name, d_in, d_out in layers if "bbox_pred" not in name]
        numbers = SketchedClassCaches.numbers_per_class(scored, rank)
        shared = sum(d_in * min(rank, d_in) for d_in, _ in scored) * 4
        return CacheMemory("sketch", numbers * width, shared, num_classes, numbers)
    if selection.get("score_parameters", "heads") != "heads":
        raise ValueError("the memory of exact caches over all parameters needs the model; "
                         "build it and count its trainable parameters")
    numbers = sum(d_in * d_out + d_out for _, d_in, d_out in layers)
    return CacheMemory("exact", numbers * width, 0, num_classes, numbers)

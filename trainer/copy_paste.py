"""Copy-paste of generated candidates onto real training images (X-Paste/BSGAL style).

For each pasted candidate:

1. size: a relative side s = sqrt(object area / image area) is drawn from its class's real
   statistics (mean ± std of s over the class's training instances, normal, clipped to
   mean ± 2 std and to [``min_side``, ``max_side``]); classes with fewer than
   ``min_class_instances`` real instances use the statistics of all classes;
2. aspect jitter: width × sqrt(a), height / sqrt(a) with a ~ U(0.8, 1.2);
3. horizontal flip with probability 0.5, uniformly random position fully inside the image;
4. hard-mask blending: the object's pixels replace the image's;
5. occlusion: masks of instances already in the image (real, or pasted before) lose the pasted
   pixels; an instance left with less than ``min_visible_fraction`` of its pixels (or fewer than
   ``min_pixels``) is dropped; boxes of occluded instances are recomputed from their masks.

Which candidates go where: every image draws a count in 0..``max_per_image``; candidates are then
chosen class-balanced (a class uniformly among the classes still waiting, then one of its
candidates) without replacement, so that every candidate is used exactly once. A step with
candidates waiting pastes at least one.

Arrays: images H x W x 3 uint8 RGB; boxes N x 4 float32 XYXY pixels; labels N int64 (1..K);
masks N x H x W bool; generated N bool.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from trainer.candidates import Candidate
from trainer.datasets.lvis_format import LvisDataset
from trainer.sampling import generator_state, set_generator_state


@dataclass(frozen=True)
class SideStatistics:
    """Mean and standard deviation of the relative side s = sqrt(area / image area)."""

    mean: float
    std: float


class ClassSizeStatistics:
    """Per-label size statistics of real instances, with an all-classes fallback.

    Args:
        per_label: label (1..K) → statistics, for labels with enough instances.
        overall: statistics over all instances (used for the other labels).
    """

    def __init__(self, per_label: dict[int, SideStatistics], overall: SideStatistics) -> None:
        self.per_label = dict(per_label)
        self.overall = overall

    @classmethod
    def from_dataset(cls, dataset: LvisDataset, min_class_instances: int = 2
                     ) -> ClassSizeStatistics:
        """From the annotation file alone (``area`` of each annotation; no image is read)."""
        image_area = {im["id"]: float(im["height"] * im["width"]) for im in dataset.images}
        sides: dict[int, list[float]] = {}
        for image_id, anns in dataset.anns_by_image.items():
            for ann in anns:
                if ann["area"] > 0:
                    label = dataset.cat_by_id[ann["category_id"]].label
                    side = math.sqrt(ann["area"] / image_area[image_id])
                    sides.setdefault(label, []).append(side)
        everything = [s for v in sides.values() for s in v]
        if not everything:
            raise ValueError(f"{dataset.json_uri}: no annotation with a positive area; cannot "
                             "size pasted instances")
        overall = SideStatistics(float(np.mean(everything)), float(np.std(everything)))
        per_label = {label: SideStatistics(float(np.mean(v)), float(np.std(v)))
                     for label, v in sides.items() if len(v) >= min_class_instances}
        return cls(per_label, overall)

    def get(self, label: int) -> SideStatistics:
        return self.per_label.get(int(label), self.overall)


@dataclass(frozen=True)
class Placement:
    """One candidate as drawn onto an image: ``rgb`` h x w x 3 uint8 and ``mask`` h x w bool
    after resizing and flipping, top-left corner (``y``, ``x``) in pixels."""

    position: int
    label: int
    rgb: np.ndarray
    mask: np.ndarray
    y: int
    x: int


@dataclass
class PastedImage:
    """A real image with candidates pasted on it, and the untouched original.

    Attributes:
        image: H x W x 3 uint8, with the pastes.
        boxes, labels, masks, generated: the instances after pasting and occlusion (real first,
            then pasted ones that survived).
        pasted_positions: batch positions of the candidates pasted here (whether or not they
            survived later pastes), in paste order.
        original: the real sample as it came from the dataset (``image``, ``boxes``,
            ``labels``, ``masks``), untouched: the faithful reject path trains on it.
        source_positions: N int64, per instance the batch position of the candidate it came
            from (-1 for a real instance).
        placements: how each pasted candidate was drawn (`CopyPaste.rerender` composes a
            subset of them again).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    generated: np.ndarray
    pasted_positions: list[int] = field(default_factory=list)
    original: dict[str, Any] = field(default_factory=dict)
    source_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    placements: list[Placement] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return int(self.generated.sum())


def _box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


class CopyPaste:
    """Pastes candidates onto real images (module docstring).

    Args:
        sizes: per-class size statistics of the real set.
        max_per_image: most candidates pasted on one image (count drawn in 0..max).
        aspect_range: range of the aspect jitter a.
        flip_probability: chance of a horizontal flip.
        min_side, max_side: bounds of the relative side s.
        min_visible_fraction: an instance keeping less of its pixels is dropped.
        min_pixels: an instance (or resized candidate) with fewer pixels is dropped.
        seed: seed of the paster's own generator (checkpointed with `state_dict`).
    """

    def __init__(self, sizes: ClassSizeStatistics, *, max_per_image: int = 3,
                 aspect_range: tuple[float, float] = (0.8, 1.2), flip_probability: float = 0.5,
                 min_side: float = 0.05, max_side: float = 0.8,
                 min_visible_fraction: float = 0.3, min_pixels: int = 4, seed: int = 0) -> None:
        if max_per_image < 1:
            raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
        self.sizes = sizes
        self.max_per_image = int(max_per_image)
        self.aspect_range = aspect_range
        self.flip_probability = flip_probability
        self.min_side = min_side
        self.max_side = max_side
        self.min_visible_fraction = min_visible_fraction
        self.min_pixels = min_pixels
        self.rng = np.random.default_rng(seed)

    # -- which candidates go on which image ------------------------------------------------

    def assign(self, pool: list[Candidate], num_images: int) -> list[list[Candidate]]:
        """Take candidates out of ``pool`` (in place) for ``num_images`` images.

        Each image draws a count in 0..max_per_image; a draw of zero everywhere while candidates
        wait becomes one candidate on a random image. Choice is class-balanced.
        """
        counts = self.rng.integers(0, self.max_per_image + 1, size=num_images)
        if pool and counts.sum() == 0:
            counts[self.rng.integers(0, num_images)] = 1
        chosen: list[list[Candidate]] = []
        for count in counts:
            here = []
            for _ in range(int(count)):
                if not pool:
                    break
                classes = sorted({c.label for c in pool})
                label = classes[int(self.rng.integers(0, len(classes)))]
                of_class = [i for i, c in enumerate(pool) if c.label == label]
                here.append(pool.pop(of_class[int(self.rng.integers(0, len(of_class)))]))
            chosen.append(here)
        return chosen

    # -- pasting ---------------------------------------------------------------------------

    def _resized(self, candidate: Candidate, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        stats = self.sizes.get(candidate.label)
        side = self.rng.normal(stats.mean, stats.std)
        side = float(np.clip(side, stats.mean - 2 * stats.std, stats.mean + 2 * stats.std))
        side = float(np.clip(side, self.min_side, self.max_side))
        aspect = self.rng.uniform(*self.aspect_range)
        flip = self.rng.random() < self.flip_probability
        target_area = side * side * height * width
        scale = math.sqrt(target_area / max(int(candidate.mask.sum()), 1))
        h0, w0 = candidate.mask.shape
        new_w = w0 * scale * math.sqrt(aspect)
        new_h = h0 * scale / math.sqrt(aspect)
        shrink = min(1.0, width / new_w, height / new_h)
        new_w = int(np.clip(round(new_w * shrink), 1, width))
        new_h = int(np.clip(round(new_h * shrink), 1, height))
        rgb = np.asarray(Image.fromarray(candidate.rgb).resize((new_w, new_h), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(candidate.mask.astype(np.uint8) * 255)
                          .resize((new_w, new_h), Image.NEAREST)) > 127
        if flip:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        if mask.sum() < self.min_pixels:
            return None
        return rgb, mask

    def place(self, candidate: Candidate, height: int, width: int) -> Placement | None:
        """Draw where and how ``candidate`` goes on an image of ``height`` x ``width`` (size,
        aspect, flip, position); None when it is too small once resized (not pasted)."""
        resized = self._resized(candidate, height, width)
        if resized is None:
            return None
        rgb, local = resized
        h, w = local.shape
        y = int(self.rng.integers(0, height - h + 1))
        x = int(self.rng.integers(0, width - w + 1))
        return Placement(candidate.position, candidate.label, rgb, local, y, x)

    def paste(self, sample: dict[str, Any], candidates: Sequence[Candidate]) -> PastedImage:
        """Paste ``candidates`` (in order, later on top) onto a real ``sample``.

        ``sample`` has ``image``, ``boxes``, ``labels``, ``masks`` (see module docstring); it is
        not modified and is kept as ``original``.
        """
        height, width = sample["image"].shape[:2]
        placements = []
        for candidate in candidates:
            placed = self.place(candidate, height, width)
            if placed is not None:
                placements.append(placed)
        return self.render(sample, placements, [c.position for c in candidates])

    def render(self, sample: dict[str, Any], placements: Sequence[Placement],
               positions: Sequence[int] | None = None) -> PastedImage:
        """Compose ``placements`` (in order, later on top) onto ``sample``; draws no random
        numbers, so the same placements always give the same image."""
        image = sample["image"].copy()
        height, width = image.shape[:2]
        masks = [m.copy() for m in sample["masks"]]
        boxes = [b.astype(np.float32) for b in sample["boxes"]]
        labels = [int(x) for x in sample["labels"]]
        sources = [-1] * len(labels)
        area_before = [int(m.sum()) for m in masks]
        changed = [False] * len(labels)
        for placed in placements:
            local = placed.mask
            h, w = local.shape
            y, x = placed.y, placed.x
            full = np.zeros((height, width), dtype=bool)
            full[y:y + h, x:x + w] = local
            region = image[y:y + h, x:x + w]
            region[local] = placed.rgb[local]
            for i, m in enumerate(masks):
                if changed[i] or (m & full).any():
                    m &= ~full
                    changed[i] = True
            masks.append(full)
            boxes.append(_box_of(full))
            labels.append(placed.label)
            sources.append(placed.position)
            area_before.append(int(full.sum()))
            changed.append(False)
        keep = []
        for i, m in enumerate(masks):
            if not changed[i]:
                keep.append(i)
                continue
            visible = int(m.sum())
            if visible >= self.min_pixels and visible >= self.min_visible_fraction * area_before[i]:
                boxes[i] = _box_of(m)
                keep.append(i)
        source = np.array([sources[i] for i in keep], dtype=np.int64)
        return PastedImage(
            image=image,
            boxes=np.array([boxes[i] for i in keep], dtype=np.float32).reshape(-1, 4),
            labels=np.array([labels[i] for i in keep], dtype=np.int64),
            masks=np.array([masks[i] for i in keep], dtype=bool).reshape(-1, height, width),
            generated=source >= 0,
            pasted_positions=list(positions if positions is not None
                                  else [p.position for p in placements]),
            original=sample,
            source_positions=source,
            placements=list(placements),
        )

    def rerender(self, pasted: PastedImage, keep: Collection[int]) -> PastedImage:
        """``pasted`` with only the candidates whose positions are in ``keep``: the others are
        absent, pixel for pixel as if they had never been drawn (the kept ones keep their size,
        flip and place; occlusion is recomputed among what remains)."""
        kept = [p for p in pasted.placements if p.position in keep]
        return self.render(pasted.original, kept,
                           [q for q in pasted.pasted_positions if q in keep])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": generator_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])

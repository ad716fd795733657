"""Real training images as the train step consumes them: decoded samples and model inputs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trainer.backends.base import image_tensor, target_tensors
from trainer.copy_paste import PastedImage
from trainer.datasets.lvis_format import DatasetFormatError, LvisDataset


class RealImages:
    """Decoded samples of an `LvisDataset`, with a small LRU cache of decoded images.

    Args:
        dataset: the split.
        cache_size: decoded samples kept in memory (0 disables). The built-in set (a few
            hundred 128 px images) fits whole; for LVIS keep it modest.

    Samples are ``{"image_id", "image" H x W x 3 uint8, "boxes" N x 4 float32 XYXY,
    "labels" N int64 (1..K), "category_ids" N, "masks" N x H x W bool}``; treat them as
    read-only (they may be shared through the cache).
    """

    def __init__(self, dataset: LvisDataset, cache_size: int = 256) -> None:
        self.dataset = dataset
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._bad: set[int] = set()
        self.category_ids_per_image = dataset.category_ids_per_image()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        sample = self._load(index)
        if self.cache_size > 0:
            self._cache[index] = sample
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return sample


    def _load(self, index: int) -> dict[str, Any]:
        """Sample ``index``; under ``bad_images=skip`` one that does not load is recorded and
        the next one that does stands in for it (deterministic: the next index, cyclically)."""
        n = len(self.dataset)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            sample = self.dataset.load_or_skip(i)
            if sample is not None:
                return sample
            self._bad.add(i)
        raise DatasetFormatError(f"{self.dataset.json_uri}: none of its {n} images loads "
                                 f"({len(self.dataset.skipped)} skipped)")


def real_inputs(samples: Sequence[dict[str, Any]], device: torch.device | str
                ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Model inputs (images, targets with all instances real) for real samples."""
    images = [image_tensor(s["image"], device) for s in samples]
    targets = [target_tensors(s["boxes"], s["labels"], s["masks"], None, device)
               for s in samples]
    return images, targets


def pasted_inputs(pasted: Sequence[PastedImage], device: torch.device | str
                  ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Model inputs for pasted images; ``generated`` flags mark the pasted instances."""
    images = [image_tensor(p.image, device) for p in pasted]
    targets = [target_tensors(p.boxes, p.labels, p.masks, p.generated, device) for p in pasted]
    return images, targets


def original_inputs(pasted: Sequence[PastedImage], device: torch.device | str
                    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Model inputs for the un-pasted originals of pasted images (the reject path)."""
    return real_inputs([p.original for p in pasted], device)

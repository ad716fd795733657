"""Which real images a step uses: repeat-factor sampling and a class-aware "test" sampler.

`RepeatFactorSampler` is LVIS's image sampler (Gupta et al., 2019; the reference uses it with
threshold t = 0.001): category c gets r(c) = max(1, sqrt(t / f(c))) with f(c) the fraction of
training images that contain c, an image gets r(I) = max over its categories (1 without any),
and every epoch repeats each image floor(r) times plus once more with probability frac(r), in a
random order. The stream is infinite and resumable: epoch ``e`` is drawn from
``np.random.default_rng([seed, e])``, so a position (epoch, offset) is all the state there is.

`ClassAwareSampler` draws the reference's real "test" batch: real training images, each
containing one of the classes pasted in this step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def repeat_factors(category_ids_per_image: Sequence[set[int]], threshold: float = 0.001
                   ) -> np.ndarray:
    """r(I) per image (float64, >= 1) for LVIS repeat-factor sampling with threshold ``t``."""
    if threshold < 0:
        raise ValueError(f"repeat-factor threshold must be >= 0, got {threshold}")
    num_images = len(category_ids_per_image)
    if num_images == 0:
        raise ValueError("no training images to sample from")
    counts: dict[int, int] = {}
    for cats in category_ids_per_image:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    category_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images)))
                       for c, n in counts.items()}
    return np.array([max((category_factor[c] for c in cats), default=1.0)
                     for cats in category_ids_per_image], dtype=np.float64)


class RepeatFactorSampler:
    """Infinite, resumable stream of training image indices with LVIS repeat factors.

    Args:
        category_ids_per_image: the category ids present in each image (by dataset index).
        threshold: t (LVIS/reference: 0.001). 0 gives plain shuffled epochs.
        seed: stream seed.
    """

    def __init__(self, category_ids_per_image: Sequence[set[int]], threshold: float = 0.001,
                 seed: int = 0) -> None:
        self.factors = repeat_factors(category_ids_per_image, threshold)
        self.seed = int(seed)
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        whole = np.floor(self.factors)
        repeats = whole + (rng.random(len(self.factors)) < self.factors - whole)
        order = np.repeat(np.arange(len(self.factors)), repeats.astype(np.int64))
        return rng.permutation(order)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` image indices of the stream."""
        out: list[int] = []
        while len(out) < count:
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(out), len(self._order) - self.offset)
            out.extend(int(i) for i in self._order[self.offset:self.offset + take])
            self.offset += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._epoch_order(self.epoch)


class ClassAwareSampler:
    """Real images that contain given classes (the reference's real "test" batch).

    Args:
        category_ids_per_image: the category ids present in each image (by dataset index).
        seed: seed of the sampler's own generator (checkpointed with `state_dict`).
    """

    def __init__(self, category_ids_per_image: Sequence[set[int]], seed: int = 0) -> None:
        self.images_of: dict[int, np.ndarray] = {}
        by_class: dict[int, list[int]] = {}
        for index, cats in enumerate(category_ids_per_image):
            for c in cats:
                by_class.setdefault(int(c), []).append(index)
        self.images_of = {c: np.array(v, dtype=np.int64) for c, v in by_class.items()}
        self.num_images = len(category_ids_per_image)
        if self.num_images == 0:
            raise ValueError("no training images to sample from")
        self.rng = np.random.default_rng(seed)

    def sample(self, category_ids: Sequence[int], count: int) -> list[int]:
        """``count`` image indices, the j-th containing category ``order[j % n]``.

        ``order`` is ``category_ids`` (deduplicated) in a random order, so with at least
        ``count`` categories every image brings a different one. A category that no training
        image contains is served by a uniformly random image instead.
        """
        classes = sorted({int(c) for c in category_ids})
        if not classes:
            return [int(i) for i in self.rng.integers(0, self.num_images, size=count)]
        order = self.rng.permutation(classes)
        out = []
        for j in range(count):
            pool = self.images_of.get(int(order[j % len(order)]))
            if pool is None:
                out.append(int(self.rng.integers(0, self.num_images)))
            else:
                out.append(int(pool[self.rng.integers(0, len(pool))]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": generator_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as plain data (dict of str/int; loads with weights_only)."""
    return rng.bit_generator.state


def set_generator_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state

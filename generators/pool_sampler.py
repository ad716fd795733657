"""Class-balanced draws from an instance pool, cycled over epochs, deterministic by position.

Draw ``i`` of the stream (``i`` = 0, 1, ...) picks a class uniformly among the pool's classes
(the reference's rule: a class first, then an instance), then the next instance of that class
in a per-class shuffled order: the ``j``-th draw of class ``k`` takes position ``j mod n_k`` of
the permutation of epoch ``j // n_k`` of that class. So within one epoch of a class every
instance comes once, a small class is cycled more often than a large one, and a new epoch has
a new order. Each draw is a new candidate: its ``sample_id`` hashes (run, class, the entry's
pool id, ``i``), so the same entry drawn twice gives two rows with the same source id.

Draw ``i`` depends only on (seed, run id, i) and the pool's class sizes, so a resumed run asks
for positions and gets the same draws (:meth:`PoolSampler.sample_positions`). Finding the
instance of a draw counts the earlier draws of its class: O(max position) time and 8 bytes
per position of memory, once per call.

Output columns (numpy): ``sample_id`` str, ``class_id`` int64, ``seed`` int64 (the draw's
position), ``pool_entry`` int64 (global entry number in the pool's index, class-major).
"""

from __future__ import annotations

import math

import numpy as np

from generators.columns import CLASS_ID, SAMPLE_ID, SEED, string_column
from generators.prompts import _hash_u64, _stream_key, _uniform, make_sample_id

POOL_ENTRY = "pool_entry"


def affine_permutation(n: int, key: int) -> tuple[int, int]:
    """``(a, b)`` with ``gcd(a, n) == 1``: ``r -> (a * r + b) % n`` permutes ``range(n)``;
    ``key`` (a 64-bit int) chooses them."""
    if n <= 1:
        return 1, 0
    a = 1 + key % (n - 1)
    while math.gcd(a, n) != 1:
        a = a % (n - 1) + 1
    return a, (key >> 32) % n


class PoolSampler:
    """Deterministic class-balanced draws over a pool's class sizes.

    Args:
        class_ids: int64 [C], the pool's classes.
        counts: int64 [C], entries per class (each >= 1).
        source_ids: callable ``entry number -> the entry's id in the pool`` (hashed into the
            sample id), or None to hash the entry number.
        run_id, seed: the run's identity; another seed gives another stream.
        pool: the pool's URI (part of the stream key and of every sample id).
    """

    def __init__(self, class_ids: np.ndarray, counts: np.ndarray, *, run_id: str, seed: int,
                 pool: str, source_ids=None) -> None:
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if len(self.class_ids) == 0 or (self.counts < 1).any():
            raise ValueError("a pool sampler needs at least one class and >= 1 entry per class")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.run_id, self.pool = str(run_id), str(pool)
        self.generator = f"pool:{pool}"
        self.source_ids = source_ids
        self._class_key = _stream_key("pool-class", seed, run_id, pool)
        self._order_key = _stream_key("pool-order", seed, run_id, pool)

    def classes_of(self, n: int) -> np.ndarray:
        """The class index (0..C-1) of draws 0..n-1 (int64 [n])."""
        u = _uniform(self._class_key, np.arange(n, dtype=np.int64))
        return np.minimum((u * len(self.class_ids)).astype(np.int64), len(self.class_ids) - 1)

    def entries_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(class index, global entry number)`` of each position (int64 arrays)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if (pos < 0).any():
            raise ValueError(f"stream positions must be >= 0, got {pos[pos < 0][:5].tolist()}")
        classes = self.classes_of(int(pos.max()) + 1)
        # The j of each draw: how many earlier draws chose its class.
        order = np.argsort(classes, kind="stable")
        rank = np.empty_like(order)
        sorted_classes = classes[order]
        first = np.searchsorted(sorted_classes, sorted_classes, side="left")
        rank[order] = np.arange(len(order)) - first
        k, j = classes[pos], rank[pos]
        n = self.counts[k]
        epoch, r = j // n, j % n
        local = np.empty_like(r)
        pairs = {}
        for i, (kk, ee) in enumerate(zip(k.tolist(), epoch.tolist())):
            if (kk, ee) not in pairs:
                key = int(_hash_u64(self._order_key, np.array([kk * 1_000_003 + ee]))[0])
                pairs[kk, ee] = affine_permutation(int(self.counts[kk]), key)
            a, b = pairs[kk, ee]
            local[i] = (a * int(r[i]) + b) % int(self.counts[kk])
        return k, self.starts[k] + local

    def sample_positions(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The draws at ``positions`` as numpy columns (module docstring)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        k, entry = self.entries_of(pos)
        cids = self.class_ids[k]
        ids = [make_sample_id(self.run_id, int(c), self._source_id(int(e)), int(p),
                              self.generator) for c, e, p in zip(cids, entry, pos)]
        return {SAMPLE_ID: string_column(ids), CLASS_ID: cids.astype(np.int64),
                SEED: pos.copy(), POOL_ENTRY: entry.astype(np.int64)}

    def sample_batch(self, n: int, start: int = 0) -> dict[str, np.ndarray]:
        """Draws ``start .. start+n-1``."""
        if n < 0 or start < 0:
            raise ValueError(f"need n >= 0 and start >= 0, got n={n}, start={start}")
        return self.sample_positions(np.arange(start, start + n, dtype=np.int64))

    def _source_id(self, entry: int) -> str:
        return str(entry) if self.source_ids is None else str(self.source_ids(entry))

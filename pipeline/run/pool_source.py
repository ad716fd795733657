"""The draw rows of a run over a pool (``generation.backend: pool``), built on the driver.

:class:`PoolDraws` has the interface of the prompt sampler that the job and its resume use
(``sample_batch(n)``, ``sample_positions(positions)``): row ``i`` is draw ``i`` of
:class:`generators.pool_sampler.PoolSampler` over the pool's index, with the entry's reference
and provenance attached, so a worker opens its entry without ever holding the index.

Columns: ``sample_id``, ``class_id``, ``class_name`` (the training set's name), ``prompt``
(``""``), ``seed`` (the draw's position), ``generator`` (``pool:<format>@1``), ``source`` (the pool's URI), ``source_id`` (the
entry's id in the pool), ``pool_ref`` (what the reader opens), ``mask_score`` (the pool's, or
NaN), ``status`` and ``error``. A pool class the training set does not have (or names
otherwise) refuses the run at the start with the list (``generation.pool_unknown_classes:
error``), or with ``rows`` is drawn anyway, each draw ``invalid_unknown_class`` with the pool
file and the fix in ``error`` (never dropped); a pool whose classes the training set has none
of is an error either way (its layout or id base is wrong).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from generators.columns import (
    CLASS_ID,
    CLASS_NAME,
    ERROR,
    GENERATOR,
    INVALID_UNKNOWN_CLASS,
    PROMPT,
    SAMPLE_ID,
    SEED,
    SOURCE,
    SOURCE_ID,
    STATUS,
    STATUS_OK,
    string_column,
)
from generators.pool_sampler import POOL_ENTRY, PoolSampler
from generators.prompts import make_sample_id
from pipeline.config import ConfigError, RunConfig
from pipeline.run.pool_stage import POOL_REF
from pipeline.storage.pool_index import PoolFormatError, PoolIndex, read_pool
from selector.methods import selection_method

MASK_SCORE = "mask_score"


class PoolDraws:
    """Draw rows over a :class:`PoolIndex` for a training vocabulary.

    Args:
        index: the pool.
        categories: the training set's LVIS category dicts (``id``, ``name``).
        run_id, seed: the run's identity (the draws depend on them).
    """

    def __init__(self, index: PoolIndex, categories: Sequence[Mapping[str, Any]], *,
                 run_id: str, seed: int, unknown_classes: str = "error") -> None:
        self.index = index
        self.names = {int(c["id"]): str(c["name"]) for c in categories}
        self.problems = {int(cid): self._problem(int(cid)) for cid in index.class_ids}
        usable = [cid for cid, p in self.problems.items() if not p]
        bad = [p for p in self.problems.values() if p]
        if bad and usable and unknown_classes == "error":
            shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise PoolFormatError(
                f"{len(bad)} of the pool's {len(index.class_ids)} classes are not classes of "
                f"the training set ({shown}); fix the pool, or set "
                "generation.pool_unknown_classes=rows to draw them anyway as "
                "invalid_unknown_class rows")
        if not usable:
            raise PoolFormatError(
                f"{index.uri}: none of the pool's {len(index.class_ids)} classes (ids "
                f"{_ids(index.class_ids)}) is a class of the training set (ids "
                f"{_ids(sorted(self.names))}); "
                + ("X-Paste pools are keyed by LVIS id - 1: the pool must be built for the "
                   "same vocabulary" if index.format == "xpaste" else
                   "the pool was made for another data set"))
        self.sampler = PoolSampler(index.class_ids, index.counts, run_id=run_id, seed=seed,
                                   pool=index.uri, source_ids=index.source_ids.__getitem__)

    def _problem(self, cid: int) -> str:
        where = f"{self.index.uri}: class id {cid}"
        if cid not in self.names:
            key = f" (key \"{cid - 1}\")" if self.index.format == "xpaste" else ""
            return (f"{where}{key} is not a class of the training set; remove it from the pool "
                    "or train on a data set that has it")
        pool_name = self.index.class_names.get(cid)
        if pool_name and pool_name != self.names[cid]:
            return (f"{where} is '{pool_name}' in the pool but '{self.names[cid]}' in the "
                    "training set; the pool was made for another vocabulary")
        return ""

    def sample_positions(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The draw rows at ``positions`` (module docstring)."""
        rows = self.sampler.sample_positions(positions)
        return self._with_entries(rows, rows.pop(POOL_ENTRY))

    def every_entry(self) -> dict[str, np.ndarray]:
        """One row per entry of the pool, in the index's order, each once (``bsgal
        rescore``): ``seed`` is the row's position; ``sample_id`` is the entry's own id for
        an earlier run's shards or a bsgal export-pool folder (the rows judged again keep the
        run's ids, so the two judgements join) and otherwise a hash of the pool and the
        entry's id, the same for every rescoring of the pool."""
        index = self.index
        entries = np.arange(len(index), dtype=np.int64)
        cids = np.repeat(index.class_ids, index.counts).astype(np.int64)
        if index.keeps_sample_ids:
            ids = [index.source_ids[int(e)] for e in entries]
        else:
            ids = [make_sample_id(f"pool:{index.uri}", int(c), index.source_ids[int(e)], 0)
                   for c, e in zip(cids, entries)]
        rows = {SAMPLE_ID: string_column(ids), CLASS_ID: cids, SEED: entries.copy()}
        return self._with_entries(rows, entries)

    def _with_entries(self, rows: dict[str, np.ndarray], entries: np.ndarray
                      ) -> dict[str, np.ndarray]:
        cids = rows[CLASS_ID]
        problems = [self.problems[int(c)] for c in cids]
        rows[CLASS_NAME] = string_column(self.names.get(int(c), self.index.class_names.get(
            int(c), "")) for c in cids)
        rows[PROMPT] = string_column([""] * len(cids))
        rows[GENERATOR] = string_column([f"pool:{self.index.format}@1"] * len(cids))
        rows[SOURCE] = string_column([self.index.uri] * len(cids))
        rows[SOURCE_ID] = string_column(self.index.source_ids[int(e)] for e in entries)
        rows[POOL_REF] = string_column(self.index.refs[int(e)] for e in entries)
        rows[MASK_SCORE] = self.index.mask_scores[entries].astype(np.float32)
        rows[STATUS] = string_column(INVALID_UNKNOWN_CLASS if p else STATUS_OK
                                     for p in problems)
        rows[ERROR] = string_column(problems)
        return rows

    def sample_batch(self, n: int, start: int = 0) -> dict[str, np.ndarray]:
        """Draw rows ``start .. start+n-1``."""
        return self.sample_positions(np.arange(start, start + n, dtype=np.int64))


def _ids(ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def pool_draws(cfg: RunConfig, categories: Sequence[Mapping[str, Any]]) -> PoolDraws:
    """The :class:`PoolDraws` of ``cfg.generation`` (``backend: pool``).

    Raises:
        PoolFormatError: the pool is missing, empty, in the wrong layout or of another
            vocabulary.
        ConfigError: a quality gate asks for a field the pool does not record.
    """
    g = cfg.generation
    index = read_pool(g.pool, g.pool_format, decisions=tuple(g.pool_decisions),
                      storage_options=g.pool_storage_options, path_map=dict(g.pool_path_map),
                      class_ids={str(c["name"]): int(c["id"]) for c in categories})
    sel = cfg.selection
    gated = sel.granularity == "instance" and selection_method("instance", sel.method).gated
    # An images pool is annotated during the run: the annotator gives every mask its score.
    if gated and MASK_SCORE in sel.quality_gates and not index.has_mask_scores:
        raise ConfigError(
            f"selection.quality_gates: the gate on {MASK_SCORE} cannot be applied to "
            f"{g.pool} (a {index.format} pool records no mask score, every candidate would be "
            "invalid_nan_field); set selection.quality_gates={} or choose "
            "selection.method=bsgal")
    return PoolDraws(index, categories, run_id=cfg.name, seed=cfg.seed,
                     unknown_classes=g.pool_unknown_classes)

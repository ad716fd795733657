"""How Ray Train hands the candidate stream to its workers.

Ray Train's default `DataConfig` splits a dataset with ``streaming_split(equal=True)``, which
may drop rows to give every worker the same count. A dropped candidate would get no decision
row, so candidates are split with ``equal=False`` (workers may receive different counts; the
train loop keeps DDP ranks in step itself), with the run's execution options (stream order,
CPU budget) set explicitly rather than taken from whichever process configures the split.
"""

from __future__ import annotations

from typing import Any

import ray.train
from ray.data import ExecutionOptions


class CandidateDataConfig(ray.train.DataConfig):
    """`ray.train.DataConfig` that never drops a candidate (see the module docstring)."""

    def __init__(self, execution_options: ExecutionOptions) -> None:
        super().__init__(datasets_to_split="all", execution_options=execution_options)
        self._options = execution_options

    def configure(self, datasets: dict[str, Any], world_size: int,
                  worker_handles: Any = None, worker_node_ids: Any = None,
                  **kwargs: Any) -> list[dict[str, Any]]:
        import copy

        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = copy.deepcopy(self._options)
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                         locality_hints=hints)):
                output[i][name] = split
        return output

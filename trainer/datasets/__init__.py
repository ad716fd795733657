"""Datasets: LVIS-format splits (local or s3://) and the built-in long-tailed set."""

from trainer.datasets.builtin import builtin_classes, write_builtin_dataset
from trainer.datasets.lvis_format import (
    CategoryInfo,
    DatasetFormatError,
    LvisDataset,
    load_lvis_json,
)

__all__ = [
    "CategoryInfo",
    "DatasetFormatError",
    "LvisDataset",
    "builtin_classes",
    "load_lvis_json",
    "write_builtin_dataset",
]

"""The real data a run trains and evaluates on, from the ``data`` section of the config.

``data.dataset: builtin`` is synthesised into ``data.root`` when its JSONs are missing, on the
driver before anything starts and again on any worker whose machine lacks the folder (the same
``synth_*`` settings write byte-identical files, so two writers cannot disagree).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import DataConfig
from pipeline.storage.filesystem import filesystem, is_uri
from trainer.datasets.lvis_format import join_uri


def ensure_builtin_data(data: DataConfig) -> bool:
    """Write the built-in set to ``data.root`` if it is the built-in set and missing there;
    return whether it was written."""
    if data.dataset != "builtin":
        return False
    fs, _ = filesystem(data.root, data.storage_options)
    if all(fs.exists(join_uri(data.root, name)) for name in (data.train_json, data.val_json)):
        return False
    if is_uri(data.root):
        raise FileNotFoundError(
            f"data.root: {data.root} holds no {data.train_json}; the built-in set is written "
            "to local folders only: write it with `bsgal data synth DIR` and copy it there, or "
            "use a local data.root")
    if (data.train_json, data.val_json) != ("train.json", "val.json"):
        raise FileNotFoundError(
            f"data.root: {data.root} holds no {data.train_json}/{data.val_json}; the built-in "
            "set is written as train.json and val.json (leave data.train_json/val_json unset)")
    from trainer.datasets.builtin import write_builtin_dataset

    write_builtin_dataset(data.root, seed=data.synth_seed, num_classes=data.synth_num_classes,
                          num_train_images=data.synth_train_images,
                          num_val_images=data.synth_val_images,
                          image_size=data.synth_image_size)
    return True


def open_splits(data: DataConfig) -> tuple[Any, Any]:
    """The training split and the validation split (``max_val_images`` applied)."""
    from trainer.datasets.lvis_format import LvisDataset

    train = LvisDataset(data.root, data.train_json, data.image_dir, data.storage_options,
                        bad_images=data.bad_images)
    val = LvisDataset(data.root, data.val_json, data.image_dir, data.storage_options,
                      max_images=data.max_val_images, bad_images=data.bad_images)
    return train, val


def train_categories(data: DataConfig) -> list[dict[str, Any]]:
    """The training JSON's ``categories`` (LVIS dicts; the built-in ones carry ``look``)."""
    from trainer.datasets.lvis_format import load_lvis_json

    return list(load_lvis_json(join_uri(data.root, data.train_json),
                               data.storage_options)["categories"])

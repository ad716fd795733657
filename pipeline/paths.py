"""Paths in a run config: which keys name files, which values are local, and making the
local ones absolute.

Relative paths are relative to the folder the user ran the command in; Ray workers run in
folders of their own, so a run resolves them on the driver (:func:`absolute_paths`) before
anything reaches a worker. ``bsgal submit`` does the same for a cluster on this machine and
ships or checks them for a remote one (:mod:`pipeline.cluster.submit`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.storage.filesystem import is_uri

#: Config keys naming small local files the driver reads: shipped in the working directory.
SHIPPED_FILE_KEYS = ("generation.extra_prompts", "generation.external_weights")
#: Config keys naming paths that must exist where the job runs (too big to ship).
NODE_PATH_KEYS = ("data.root", "annotation.sam_checkpoint", "training.init_checkpoint",
                  "generation.model", "generation.pool")


def code_root() -> str:
    """The folder holding the ``pipeline`` package this process imported: Ray workers on this
    machine must import the same code (an editable install elsewhere could shadow it)."""
    return str(Path(__file__).resolve().parent.parent)


def get_key(cfg: RunConfig, key: str) -> Any:
    """The value of ``section.name`` in ``cfg``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def set_key(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """A copy of ``cfg`` with ``section.name`` set to ``value``."""
    section, name = key.split(".")
    return replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})


def looks_local(key: str, value: str) -> bool:
    """Whether ``value`` of config key ``key`` is a local path."""
    if key == "generation.model":  # a hub id (org/name) unless it is a folder path
        return value.startswith(("/", "./", "../", "~")) or os.path.isdir(value)
    return not is_uri(value)


def absolute_local(uri: str, cwd: Path | None = None) -> str:
    """``uri`` resolved against ``cwd`` (default: this process's) when it is a relative local
    path; a URI or an absolute path as given."""
    if not uri or is_uri(uri) or os.path.isabs(uri):
        return uri
    return str(((cwd or Path.cwd()) / uri).resolve())


def absolute_paths(cfg: RunConfig, cwd: Path) -> RunConfig:
    """``cfg`` with ``output.dir`` and every local path key made absolute against ``cwd``."""
    for key in ("output.dir", *SHIPPED_FILE_KEYS, *NODE_PATH_KEYS):
        value = get_key(cfg, key)
        if value and looks_local(key, value):
            cfg = set_key(cfg, key, absolute_local(value, cwd))
    return cfg

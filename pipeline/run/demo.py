"""``bsgal demo``: the shipped demo config, and clearing an earlier demo run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.paths import code_root
from pipeline.storage.filesystem import filesystem


def demo_config_path() -> Path:
    path = Path(code_root()) / "configs" / "demo.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run bsgal demo from a checkout of the "
                                "project, or bsgal run --config YOUR.yaml")
    return path


def demo_config(overrides: Sequence[str] = (), out: str | None = None) -> RunConfig:
    """configs/demo.yaml with ``overrides``; ``out`` replaces ``output.dir``."""
    cfg = load_config(demo_config_path(), overrides)
    if out is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=out))
    return cfg


def remove_run(out: str, storage_options: dict | None = None) -> None:
    """Delete the run folder ``out`` if it is one (it has config.yaml); refuse anything else."""
    fs, path = filesystem(out, storage_options)
    if not fs.exists(path):
        return
    if not fs.exists(f"{path.rstrip('/')}/config.yaml"):
        raise ConfigError(f"--fresh: {out} exists but is not a bsgal run folder (no "
                          "config.yaml); not deleting it")
    fs.rm(path, recursive=True)

"""Hugging Face Hub settings shared by the model-loading stages (no model code here): offline
by default, whether a model name is a folder or a hub id, and the up-front check that a model
is there (a folder holding its marker file, or the local Hub cache)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def hub_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else ``HF_HUB_OFFLINE`` from the environment; offline when unset.

    bsgal is offline by default: models come from local folders or the local Hub cache, and a
    missing one is an error that says how to provide it, not a surprise download.
    """
    if offline is not None:
        return bool(offline)
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return True
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a folder (absolute, relative, existing, or not ``org/name``)
    rather than a hub id."""
    return (
        model.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(model))
        or model.count("/") != 1
    )


def hub_cached(repo_id: str, filename: str) -> bool:
    """Whether the local Hugging Face cache holds ``filename`` of ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers and diffusers depend on it
        return False
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub would refuse (bad characters): not in the cache either
        return False
    return isinstance(found, str)


def check_hub_model(report: Any, key: str, model: str, marker: str,
                    missing: Callable[[str], str]) -> None:
    """The up-front check of a model named by config key ``key``: a folder must hold
    ``marker``, a hub id must be in the local cache (a warning when downloads are allowed).
    ``report`` takes ``add(key, message)``, ``passed`` and ``warnings``
    (`pipeline.run.preflight.PreflightReport`); ``missing(model)`` says how to provide it."""
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / marker).is_file():
            report.add(key, f"{key}: {missing(model)}")
        else:
            report.passed.append(f"{key} {model} holds {marker}")
        return
    if hub_cached(model, marker):
        report.passed.append(f"{key} {model} is in the Hugging Face cache")
    elif hub_offline():
        report.add(key, f"{key}: {missing(model)}")
    else:
        report.warnings.append(f"{key}: {model} is not in the Hugging Face cache; every actor "
                               "will download it (HF_HUB_OFFLINE=0)")

"""Hugging Face Hub settings shared by the model-loading stages (no model code here)."""

from __future__ import annotations

import os


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

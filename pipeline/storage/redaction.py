"""Keeping credentials out of everything bsgal writes or prints.

Storage options (fsspec/s3fs) may hold keys and tokens. :func:`redact` replaces their values
by ``<redacted>`` before a config is written to ``OUT/config.yaml``, logged or submitted;
:func:`drop_redacted` removes such placeholders again when a stored config is read back, so
that the credentials of the environment apply.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, config_to_dict

REDACTED = "<redacted>"
#: Keys of storage options whose values are secrets (matched case-insensitively as substrings).
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")
#: Keys that contain one of those words but are not secret.
NOT_SECRET = ("endpoint_url", "region_name", "profile", "anon", "use_ssl", "client_kwargs",
              "config_kwargs")


def is_secret_key(key: str) -> bool:
    """Whether a storage-option key holds a secret value."""
    lowered = str(key).lower()
    return lowered not in NOT_SECRET and any(w in lowered for w in SECRET_WORDS)


def redact(options: Any) -> Any:
    """Storage options with every secret value replaced by ``<redacted>`` (nested dicts too)."""
    if isinstance(options, dict):
        return {key: redact(value) if isinstance(value, dict)
                else REDACTED if is_secret_key(key) else value
                for key, value in options.items()}
    return options


def drop_redacted(options: Any) -> Any:
    """``options`` without the ``<redacted>`` placeholders (nested dicts too)."""
    if isinstance(options, dict):
        return {k: drop_redacted(v) for k, v in options.items() if v != REDACTED}
    return options


def redacted_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data with the storage options' secrets redacted."""
    data = config_to_dict(cfg)
    for section in ("data", "output"):
        data[section]["storage_options"] = redact(data[section]["storage_options"])
    return data

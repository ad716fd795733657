"""The one base class of errors that are the user's to fix.

A :class:`UserError` means bad input or an unreachable resource: the command line prints its
message as one line and exits with code 1, no traceback (:mod:`pipeline.command_line`). Every
such error class of ``pipeline`` derives from it (``ConfigError``, ``StorageError``,
``QueryError`` ...); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input or an unreachable resource; the message names the value and the fix."""


class ConfigError(UserError, ValueError):
    """A config file or override is malformed; the message names the key and the fix."""


def did_you_mean(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'prefix.closest'?"`` or ``""`` when nothing is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def duckdb_error_line(exc: BaseException) -> str:
    """DuckDB's message without its multi-line source excerpt (one line for the user)."""
    kept = []
    for ln in (ln.strip() for ln in str(exc).splitlines()):
        if not ln or ln.startswith("LINE "):
            break
        kept.append(ln)
    return " ".join(kept) or type(exc).__name__

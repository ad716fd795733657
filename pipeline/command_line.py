"""What every ``bsgal`` command shares: click's context, the one error translator, the
storage flags.

:func:`user_errors` turns a :class:`pipeline.errors.UserError` (and the few library errors
that mean the same: a missing file, unreadable storage, a malformed dataset, a failed query)
into one line on stderr and exit code 1; anything else is a bug and keeps its traceback.
:func:`storage_flags` adds ``--endpoint-url`` and ``--storage-option KEY=VALUE`` to a command,
and :func:`storage_options_from` turns them into fsspec options.

Only click is imported at module level, so that ``bsgal --help`` answers at once.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from pipeline.errors import UserError, duckdb_error_line

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def user_error_line(exc: BaseException) -> str | None:
    """The one line to print for an error that is the user's to fix, or None for a bug."""
    if isinstance(exc, (UserError, FileNotFoundError)):
        return str(exc)
    from trainer.datasets.lvis_format import DatasetFormatError

    if isinstance(exc, DatasetFormatError):
        return str(exc)
    duckdb = sys.modules.get("duckdb")  # only a command that queried shards can raise it
    if duckdb is not None and isinstance(exc, duckdb.Error):
        return f"reading the shards failed: {duckdb_error_line(exc)}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return None


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a command: bad input or an unreachable resource → one line, exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            line = user_error_line(exc)
            if line is None:
                raise
            code = getattr(exc, "exit_code", 1)  # e.g. 130 after an interrupt, as shells do
            if code != 1:
                click.echo(line, err=True)
                raise SystemExit(code) from None
            raise click.ClickException(line) from None

    return wrapper


def storage_flags(fn: Callable[..., Any], what: str = "s3:// and other remote URIs",
                  endpoint_note: str = "") -> Callable[..., Any]:
    """Add ``--endpoint-url`` and ``--storage-option`` (read by :func:`storage_options_from`);
    ``what`` names the storage they apply to, ``endpoint_note`` is added to the endpoint's
    help."""
    fn = click.option("--storage-option", "storage_pairs", multiple=True, metavar="KEY=VALUE",
                      help=f"fsspec option for {what} (e.g. profile=dev); repeat for "
                           "several.")(fn)
    fn = click.option("--endpoint-url", metavar="URL", envvar="AWS_ENDPOINT_URL",
                      help="S3 endpoint (MinIO, Ceph, moto); default: AWS or "
                           f"$AWS_ENDPOINT_URL.{endpoint_note}")(fn)
    return fn


def storage_options_from(endpoint_url: str | None, pairs: tuple[str, ...]) -> dict[str, Any]:
    """fsspec options from ``--endpoint-url`` and ``--storage-option KEY=VALUE`` (values are
    read as YAML scalars: ``anon=true`` is a bool)."""
    import yaml

    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        opts[key.strip()] = yaml.safe_load(value) if value else ""
    if endpoint_url:
        opts["endpoint_url"] = endpoint_url
    return opts

"""Opening a local path or URI with fsspec, and the few questions every caller asks of it.

``filesystem(uri)`` gives the fsspec filesystem and the path inside it; :func:`is_uri` says
whether a string names remote storage (``s3://bucket/key``; ``file://`` counts as local);
:func:`is_local` says it of an opened filesystem. :func:`fast_fail_options` adds time-outs
and few retries for S3, so that an endpoint that is down fails in seconds instead of after
botocore's default retries; a user's own ``config_kwargs`` replace them.
"""

from __future__ import annotations

from typing import Any

import fsspec

from pipeline.errors import UserError

#: botocore settings for reads and probes: a dead endpoint fails at connect (5 s), a slow read
#: of a large shard still completes.
FAST_FAIL_S3 = {"connect_timeout": 5, "read_timeout": 60,
                "retries": {"max_attempts": 2, "mode": "standard"}}


class StorageError(UserError, RuntimeError):
    """Output storage is unreachable or not writable; the message names the URI and the fix."""


def is_uri(path: str) -> bool:
    """Whether ``path`` names remote storage (``s3://...``) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def filesystem(uri: str, storage_options: dict | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a local path or URI."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (paths are plain OS paths)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols


def fast_fail_options(uri: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` for ``uri`` with :data:`FAST_FAIL_S3` unless ``config_kwargs`` is given."""
    opts = dict(options or {})
    if uri.startswith(("s3://", "s3a://")):
        opts.setdefault("config_kwargs", FAST_FAIL_S3)
    return opts


def remote_options(uri: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options that apply to ``uri``: None for a local path, else
    :func:`fast_fail_options`."""
    return fast_fail_options(uri, options) if is_uri(uri) else None


def check_output_path(uri: str, storage_options: dict | None, *, kind: str, option: str
                      ) -> None:
    """Refuse, before any work, an output that cannot be written: ``kind="file"``: ``uri`` is
    a folder, or a part of its parent path is a file; ``kind="folder"``: ``uri`` (or a part
    of its path) is a file. ``option`` names the flag in the message."""
    import posixpath

    fs, path = filesystem(uri, storage_options)
    path = path.rstrip("/")
    try:
        if fs.exists(path):
            is_dir = fs.isdir(path)
            if kind == "file" and is_dir:
                raise UserError(f"{option} {uri}: is a folder; name a file, e.g. "
                                f"{posixpath.join(uri.rstrip('/'), 'report.html')}")
            if kind == "folder" and not is_dir:
                raise UserError(f"{option} {uri}: is a file; name a folder (new or empty)")
        parent = posixpath.dirname(path)
        while parent and parent not in ("/", "."):
            if fs.exists(parent):
                if not fs.isdir(parent):
                    raise UserError(f"{option} {uri}: {parent} is a file, not a folder")
                break
            parent = posixpath.dirname(parent)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the storage cannot be asked: say so
        raise UserError(f"{option} {uri}: cannot be checked ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None

"""Talking to a Ray cluster's Job server (the dashboard's HTTP port, 8265 by default).

``bsgal submit`` and ``bsgal job ...`` reach the cluster only through this HTTP API, never with
``ray.init``: a laptop need not be on the cluster's network beyond that one port (an SSH tunnel
or a Kubernetes port-forward is enough), and a wrong address fails in seconds.

* :func:`job_server_url` turns ``host``, ``host:port`` or ``http(s)://host:port`` into the URL;
* :func:`check_reachable` asks ``/api/version`` with a short timeout (Ray's own client sends
  its requests without one, so an unroutable host would hang);
* :func:`open_job_client` returns a :class:`ray.job_submission.JobSubmissionClient`;
* :func:`follow_job` streams a job's driver log until the job ends and returns its final
  status; :func:`exit_code` maps it to the exit code of the command.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import ConfigError

DEFAULT_PORT = 8265
#: Exit code of ``bsgal submit --follow`` / ``bsgal job logs --follow`` per final job status.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
TERMINAL = frozenset(EXIT_CODES)


class JobServerError(ConfigError):
    """The Job server cannot be reached, refuses a request, or does not know the job."""


def job_server_url(address: str) -> str:
    """``http://host:port`` of a Job server from ``host``, ``host:port`` (port 8265 when not
    given) or a URL (kept as written: a proxy may serve it on its scheme's port or a path).

    ``ray://`` (the Ray Client port, 10001) and bare GCS addresses (port 6379) are not the Job
    server; the error says which port to use instead.
    """
    text = (address or "").strip().rstrip("/")
    if not text:
        raise JobServerError("--address: give the Ray dashboard / Job server address, e.g. "
                             f"http://HEAD:{DEFAULT_PORT} (or set RAY_API_SERVER_ADDRESS)")
    if text.startswith("ray://") or text == "auto":
        raise JobServerError(f"--address {address}: bsgal submit talks to the Ray Job server "
                             f"(the dashboard's HTTP port, default {DEFAULT_PORT}), not the Ray "
                             f"Client; use http://HEAD:{DEFAULT_PORT}")
    default_port = None  # a URL keeps its scheme's port (a proxy on 443, say)
    if "://" not in text:
        text = f"http://{text}"
        default_port = DEFAULT_PORT
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobServerError(f"--address {address}: expected http://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise JobServerError(f"--address {address}: the port is not a number") from None
    if port == 6379:
        raise JobServerError(f"--address {address}: 6379 is the GCS port; the Job server "
                             f"listens on the dashboard port (default {DEFAULT_PORT})")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = port or default_port
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def is_local_address(url: str) -> bool:
    """Whether the Job server at ``url`` runs on this machine (a loopback address): then the
    job's local paths are this machine's paths."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_reachable(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET url/api/version`` within ``timeout`` seconds; the cluster's version info.

    Raises:
        JobServerError: one line naming the address and what failed (refused, timed out, not a
            Ray dashboard, authentication required).
    """
    import requests

    try:
        response = requests.get(f"{url}/api/version", timeout=(timeout, timeout))
    except requests.exceptions.ConnectTimeout:
        raise JobServerError(f"cannot reach the Ray Job server at {url}: no answer within "
                             f"{timeout:g} s; check the address, that the cluster is up and "
                             "that the dashboard port is open to you (or tunnel it: ssh -L "
                             f"{DEFAULT_PORT}:localhost:{DEFAULT_PORT} HEAD)") from None
    except requests.exceptions.RequestException as exc:
        reason = _reason(exc)
        raise JobServerError(f"cannot reach the Ray Job server at {url} ({reason}); check the "
                             "address and that the cluster is up (ray status on the head "
                             "node)") from None
    if response.status_code in (401, 403):
        raise JobServerError(f"the Ray Job server at {url} refused the request "
                             f"(HTTP {response.status_code}): the cluster requires "
                             "authentication; set RAY_AUTH_TOKEN as for `ray job submit`")
    try:
        info = response.json()
        info["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise JobServerError(f"{url} answered HTTP {response.status_code} but is not a Ray "
                             f"dashboard (no /api/version); the Job server is on port "
                             f"{DEFAULT_PORT} by default") from None
    return info


def _reason(exc: BaseException) -> str:
    """The innermost readable cause of a requests error (e.g. 'Connection refused')."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "nodename nor servname",
                   "No route to host", "Network is unreachable", "timed out",
                   "Temporary failure in name resolution", "certificate verify failed"):
        if marker in text:
            return marker
    return type(exc).__name__


def open_job_client(url: str, timeout: float = 5.0) -> Any:
    """A ``JobSubmissionClient`` for ``url``, after :func:`check_reachable`."""
    check_reachable(url, timeout)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as exc:
        raise JobServerError(f"the Ray Job server at {url} is not usable: {exc}") from None


def job_request(action: str, job_id: str, call: Callable[[], Any]) -> Any:
    """Run one client call; a missing job or a refused request becomes one clear line."""
    try:
        return call()
    except (RuntimeError, OSError) as exc:  # HTTP errors; requests' connection errors
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, RuntimeError) and ("does not exist" in text or "404" in text):
            raise JobServerError(f"no job {job_id!r} on this cluster (bsgal job list shows "
                                 "the jobs it knows)") from None
        raise JobServerError(f"{action} {job_id}: {text.splitlines()[0]}") from None


def status_of(client: Any, job_id: str) -> str:
    """The job's status as a plain string (``PENDING``, ``RUNNING``, ``SUCCEEDED``...)."""
    return str(job_request("status of", job_id, lambda: client.get_job_status(job_id)))


def wait_terminal(client: Any, job_id: str, timeout: float = 60.0,
                  poll: float = 0.5) -> str:
    """Poll until the job has a terminal status (or ``timeout`` s pass); the last status."""
    deadline = time.monotonic() + timeout
    status = status_of(client, job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll)
        status = status_of(client, job_id)
    return status


def follow_job(client: Any, job_id: str, write: Callable[[str], None],
               poll: float = 1.0) -> str:
    """Write the job's driver log as it grows until the job ends; its final status.

    Uses the Job server's log stream (a websocket); when that is not available (a proxy that
    drops websockets) it falls back to polling the whole log every ``poll`` seconds.
    """
    written = 0

    async def stream() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            written += len(chunk)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        raise
    except Exception:  # websocket refused or cut: poll instead, without repeating lines
        status = status_of(client, job_id)
        while True:
            logs = job_request("logs of", job_id, lambda: client.get_job_logs(job_id))
            if len(logs) > written:
                write(logs[written:])
                written = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll)
            status = status_of(client, job_id)
    # The stream closes when the driver exits; the status turns terminal a moment later.
    return wait_terminal(client, job_id, timeout=30.0, poll=0.2)


def exit_code(status: str) -> int:
    """0 for SUCCEEDED, 1 for FAILED, 2 for STOPPED, 3 for a job that is not finished."""
    return EXIT_CODES.get(status, 3)


def status_line(client: Any, job_id: str, status: str) -> str:
    """``job ID STATUS`` plus, for a failure, the first line of the server's message."""
    line = f"job {job_id} {status}"
    if status in ("FAILED", "STOPPED"):
        info = job_request("info of", job_id, lambda: client.get_job_info(job_id))
        message = (info.message or "").strip().splitlines()
        if message:
            line += f": {message[0]}"
    return line


def newest_first(jobs: list[Any]) -> list[Any]:
    """Job infos, the newest start first."""
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def latest_bsgal_job(client: Any) -> str:
    """The id of the newest job ``bsgal submit`` sent (its metadata names a run folder);
    a `JobServerError` saying how to send one when there is none."""
    try:
        jobs = client.list_jobs()
    except RuntimeError as exc:
        raise JobServerError(f"listing jobs: {str(exc).splitlines()[0]}") from None
    for info in newest_first(jobs):
        if (info.metadata or {}).get("bsgal_out") is not None:
            return str(info.submission_id or info.job_id)
    raise JobServerError("no job sent by bsgal on this cluster yet (send one with bsgal "
                         "submit; bsgal job list --all shows the others)")

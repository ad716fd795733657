"""``bsgal submit`` and ``bsgal job status|logs|stop|list``: runs as Ray Jobs on a cluster.

Registered on the main group by :mod:`pipeline.cli`. The cluster is reached through its Job
server (the dashboard's HTTP port); see :mod:`pipeline.cluster.job_client`,
:mod:`pipeline.cluster.submit` and :mod:`pipeline.cluster.capacity`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from pipeline.command_line import CONTEXT, user_errors

ADDRESS = click.option(
    "--address", envvar="RAY_API_SERVER_ADDRESS", metavar="URL",
    help="The cluster's Job server: http://HEAD:8265 (env RAY_API_SERVER_ADDRESS).")
TIMEOUT = click.option("--timeout", default=5.0, show_default=True, metavar="S",
                       help="Seconds to wait for the Job server to answer.")


def _quiet_ray_client() -> None:
    """Ray's client logs each upload at INFO on stderr; the commands say what matters."""
    import logging

    import ray.job_submission  # noqa: F401  (configures the "ray" logger; then quieten it)

    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.WARNING)


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


def _follow(client: object, job_id: str) -> None:
    """Stream the job's log until it ends; exit with its status (0 only for SUCCEEDED)."""
    from pipeline.cluster.job_client import exit_code, follow_job, status_line

    try:
        status = follow_job(client, job_id, lambda chunk: click.echo(chunk, nl=False))
    except KeyboardInterrupt:
        _echo_err(f"\nstopped following; job {job_id} keeps running "
                  f"(bsgal job stop {job_id} stops it)")
        sys.exit(130)
    _echo_err(status_line(client, job_id, status))
    sys.exit(exit_code(status))


@click.command(context_settings=CONTEXT)
@ADDRESS
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file; OVERRIDES are applied and the result is what the "
                   "cluster runs.")
@click.option("--resume", "resume_out", metavar="OUT", default=None,
              help="Continue the run in OUT (s3:// or a path as the cluster sees it) from its "
                   "last checkpoint, as `bsgal run --resume` on the cluster.")
@click.option("--follow", is_flag=True,
              help="Stream the job's log until it ends; exit 0 if it SUCCEEDED, 1 if it "
                   "FAILED, 2 if it was STOPPED.")
@click.option("--image-has-code", is_flag=True,
              help="Upload the config only and run the bsgal installed in the cluster's "
                   "image (default: upload this checkout's code with it).")
@click.option("--env", "env", multiple=True, metavar="NAME[=VALUE]",
              help="Set an environment variable for the job (value from here when not "
                   "given), e.g. --env AWS_PROFILE; values are never printed. Repeatable.")
@click.option("--job-id", default=None, help="Submission id (default: bsgal-NAME-TIME-XXXX).")
@click.option("--cluster-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The cluster launcher YAML (deploy/cluster.yaml): check the job against "
                   "the largest size the autoscaler may reach, not the nodes up now.")
@click.option("--no-resource-check", is_flag=True,
              help="Submit without comparing the job's CPUs/GPUs/resources with the cluster.")
@click.option("--no-output-check", is_flag=True,
              help="Do not probe an s3:// output from here (when only the cluster has "
                   "credentials for it; the job probes it first thing anyway).")
@TIMEOUT
@click.argument("overrides", nargs=-1)
@user_errors
def submit(address: str | None, config_path: str | None, resume_out: str | None,
           follow: bool, image_has_code: bool, env: tuple[str, ...], job_id: str | None,
           cluster_config: str | None, no_resource_check: bool, no_output_check: bool,
           timeout: float, overrides: tuple[str, ...]) -> None:
    """Run a config as a Ray Job on a cluster: same code, same config, shards in output.dir.

    Checks before anything is sent: the cluster answers, the run's actors and trainer
    workers fit its nodes (GPUs, CPUs, the bsgal_* node-type resources), and output.dir is
    writable and holds no earlier run. Prints the job id, the dashboard and where the shards
    land.

    \b
    Examples:
      bsgal submit --address http://HEAD:8265 --config configs/lvis_sd_sam.yaml \\
          output.dir=s3://bucket/bsgal/run1 --follow
      bsgal submit --address http://HEAD:8265 --resume s3://bucket/bsgal/run1
      bsgal job logs --follow ID
    """
    from pipeline.cluster.capacity import (
        check_capacity,
        launcher_capacity,
        live_capacity,
    )
    from pipeline.cluster.job_client import (
        is_local_address,
        job_server_url,
        open_job_client,
    )
    from pipeline.cluster.submit import build_submission, check_output
    from pipeline.cluster.submit import submit as send
    from pipeline.storage.shard_schema import shards_root

    if config_path is not None and resume_out is not None:
        raise click.UsageError("--resume continues a run with its own config.yaml; leave out "
                               "--config")
    _quiet_ray_client()
    url = job_server_url(address or "")
    client = open_job_client(url, timeout)
    local = is_local_address(url)
    with tempfile.TemporaryDirectory(prefix="bsgal-job-") as tmp:
        submission, cfg = build_submission(
            config_path, overrides, workdir=Path(tmp) / "job", local_cluster=local,
            resume_out=resume_out, image_has_code=image_has_code, env=env, job_id=job_id)
        if cfg is not None and not no_resource_check:
            capacity = launcher_capacity(cluster_config) if cluster_config else \
                live_capacity(url, timeout)
            for warning in check_capacity(cfg, capacity):
                _echo_err(f"warning: {warning}")
        if cfg is not None and not no_output_check:
            submission.notes.append(check_output(cfg, local, resume=resume_out is not None))
        for note in submission.notes:
            click.echo(note)
        if env:
            names = ", ".join(sorted(n.split("=", 1)[0] for n in env))
            click.echo(f"environment for the job: {names} (values not shown)")
        job = send(client, submission)
    click.echo(f"submitted job {job}")
    click.echo(f"  dashboard: {url}/#/jobs/{job}")
    click.echo(f"  shards:    {shards_root(submission.out)}")
    click.echo(f"  logs:      bsgal job logs --address {url} {'--follow ' if not follow else ''}"
               f"{job}")
    click.echo(f"  stop:      bsgal job stop --address {url} {job}")
    if follow:
        _follow(client, job)


@click.group(context_settings=CONTEXT)
def job() -> None:
    """Status, logs and stopping of jobs sent with `bsgal submit`."""


@job.command("status", context_settings=CONTEXT)
@ADDRESS
@TIMEOUT
@click.argument("job_id", required=False)
@user_errors
def job_status(address: str | None, timeout: float, job_id: str | None) -> None:
    """The status of JOB_ID (default: the newest job bsgal sent), its message, and where its
    output goes."""
    from pipeline.cluster.job_client import (
        job_request,
        job_server_url,
        latest_bsgal_job,
        open_job_client,
    )

    client = open_job_client(job_server_url(address or ""), timeout)
    job_id = job_id or latest_bsgal_job(client)
    info = job_request("status of", job_id, lambda: client.get_job_info(job_id))
    click.echo(f"{job_id}: {info.status}")
    if info.message:
        click.echo(f"  message:    {info.message.strip().splitlines()[0]}")
    click.echo(f"  entrypoint: {info.entrypoint}")
    out = (info.metadata or {}).get("bsgal_out")
    if out:
        from pipeline.storage.shard_schema import shards_root

        click.echo(f"  shards:     {shards_root(out)}")
    if info.start_time:
        end = (info.end_time or 0) / 1000 or None
        took = f", {end - info.start_time / 1000:.0f} s" if end else ""
        click.echo(f"  started:    {_when(info.start_time / 1000)}{took}")


def _when(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


@job.command("logs", context_settings=CONTEXT)
@ADDRESS
@TIMEOUT
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends; exit with "
              "its status (0 SUCCEEDED, 1 FAILED, 2 STOPPED).")
@click.argument("job_id", required=False)
@user_errors
def job_logs(address: str | None, timeout: float, follow: bool, job_id: str | None) -> None:
    """The driver log of JOB_ID (default: the newest job bsgal sent): progress lines, summary,
    errors."""
    from pipeline.cluster.job_client import (
        job_request,
        job_server_url,
        latest_bsgal_job,
        open_job_client,
    )

    _quiet_ray_client()
    client = open_job_client(job_server_url(address or ""), timeout)
    job_id = job_id or latest_bsgal_job(client)
    if follow:
        _follow(client, job_id)
    click.echo(job_request("logs of", job_id, lambda: client.get_job_logs(job_id)), nl=False)


@job.command("stop", context_settings=CONTEXT)
@ADDRESS
@TIMEOUT
@click.option("--wait", "wait_s", default=60.0, show_default=True, metavar="S",
              help="Seconds to wait for the job to end (0: do not wait).")
@click.argument("job_id")
@user_errors
def job_stop(address: str | None, timeout: float, wait_s: float, job_id: str) -> None:
    """Stop JOB_ID (its driver, stage actors and trainer workers). Its run folder keeps the
    shards and checkpoints written so far: continue with `bsgal submit --resume OUT`."""
    from pipeline.cluster.job_client import (
        TERMINAL,
        job_request,
        job_server_url,
        open_job_client,
        status_of,
        wait_terminal,
    )

    client = open_job_client(job_server_url(address or ""), timeout)
    stopped = job_request("stop", job_id, lambda: client.stop_job(job_id))
    status = wait_terminal(client, job_id, timeout=wait_s) if wait_s > 0 else \
        status_of(client, job_id)
    if not stopped:
        click.echo(f"job {job_id} had already ended: {status}")
    elif status in TERMINAL:
        click.echo(f"job {job_id} {status}")
    else:
        raise click.ClickException(f"job {job_id} is still {status} after {wait_s:g} s; "
                                   f"check again with bsgal job status {job_id}")


@job.command("list", context_settings=CONTEXT)
@ADDRESS
@TIMEOUT
@click.option("--all", "show_all", is_flag=True, help="Also jobs not sent by bsgal.")
@user_errors
def job_list(address: str | None, timeout: float, show_all: bool) -> None:
    """Jobs on the cluster, newest first: id, status, output folder."""
    from pipeline.cluster.job_client import (
        JobServerError,
        job_server_url,
        newest_first,
        open_job_client,
    )

    client = open_job_client(job_server_url(address or ""), timeout)
    try:
        jobs = client.list_jobs()
    except RuntimeError as exc:
        raise JobServerError(f"listing jobs: {str(exc).splitlines()[0]}") from None
    for info in newest_first(jobs):
        out = (info.metadata or {}).get("bsgal_out")
        if out is None and not show_all:
            continue
        ident = info.submission_id or info.job_id
        click.echo(f"{ident}  {info.status!s:9}  {out or info.entrypoint}")

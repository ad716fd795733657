"""``bsgal submit``: the run of a config as a Ray Job on a cluster, with the same code and config.

:func:`build_submission` turns a config (file + ``section.key=value`` overrides) into what the
Job server needs:

* a working directory (``runtime_env.working_dir``), made in a temporary folder: this
  checkout's packages (``pipeline``, ``generators``, ``annotators``, ``selector``,
  ``trainer``; a few hundred KiB, nothing else of the repository) unless the image already has
  the code, the resolved config with every override baked in as ``bsgal-job.yaml``, and small
  files the config names (prompt lists) under ``files/``. Ray puts the folder first on the
  job's and every worker's ``PYTHONPATH``, so the cluster runs this code, not an older copy;
* the entrypoint ``python -m pipeline.cli run --config bsgal-job.yaml --progress lines``
  (``ray.address=auto`` is set in the config: the driver joins the cluster it runs on);
* the checks that can be made before the job starts: the output is writable (an ``s3://``
  URI from here; a local path only when the cluster is this machine, otherwise the job checks
  it first thing), it does not hold a run already, and the run fits the cluster
  (:mod:`pipeline.cluster.capacity`).

Paths: on a cluster that is this machine (a loopback address) relative paths are made
absolute against the current folder, as ``bsgal run`` would read them. On a remote cluster a
relative ``output.dir`` is refused (it would land in the job's temporary working directory);
local files the config names for the driver (``generation.extra_prompts``,
``generation.external_weights``) travel in the working directory; model and data paths must
exist on the nodes (in the image, a shared volume, or ``s3://``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, dump_config, load_config
from pipeline.paths import (
    NODE_PATH_KEYS,
    SHIPPED_FILE_KEYS,
    absolute_paths,
    get_key,
    is_uri,
    looks_local,
    set_key,
)

#: The packages of this repository that make up the job's code (pyproject's package list).
PACKAGES = ("pipeline", "generators", "annotators", "selector", "trainer")
CONFIG_NAME = "bsgal-job.yaml"
#: Ray refuses working directories larger than its package limit (GCS storage); stay far below.
MAX_PACKAGE_BYTES = 100 * 2**20


@dataclass
class Submission:
    """A job ready for :func:`submit`: ids, command, runtime env, and what to tell the user.

    ``runtime_env["env_vars"]`` may hold forwarded secrets: never print it.
    """

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    out: str
    working_dir: Path
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ paths


def localize_paths(cfg: RunConfig, local_cluster: bool, cwd: Path,
                   ship: dict[str, Path]) -> tuple[RunConfig, list[str]]:
    """The config as the job must see it, and notes for the user.

    Args:
        cfg: the resolved config.
        local_cluster: the cluster runs on this machine.
        cwd: the folder relative paths are relative to here.
        ship: filled with ``name in working dir -> local file`` for files to upload.
    """
    if local_cluster:
        return absolute_paths(cfg, cwd), []
    notes: list[str] = []
    out = cfg.output.dir
    if not is_uri(out):
        if not os.path.isabs(out):
            raise ConfigError(
                f"output.dir: {out} is a relative path; on the cluster it would land inside "
                "the job's temporary working directory. Use s3://bucket/prefix (or an "
                "absolute path on a filesystem every node mounts)")
        else:
            notes.append(f"output.dir {out} is a path on the cluster's nodes, not on this "
                         "machine; with several nodes it must be a shared filesystem mounted "
                         "there on every node (s3:// needs nothing shared)")
    for key in SHIPPED_FILE_KEYS:
        value = get_key(cfg, key)
        if not value or is_uri(value):
            continue
        local = (cwd / value).resolve()
        if local.is_file():
            name = f"files/{len(ship)}-{local.name}"
            ship[name] = local
            cfg = set_key(cfg, key, name)
        else:
            notes.append(f"{key}: {value} is not a file here; the job expects it on the "
                         "cluster at that path")
    for key in NODE_PATH_KEYS:
        value = get_key(cfg, key)
        if not value or not looks_local(key, value):
            continue
        if key == "data.root" and cfg.data.dataset == "builtin":
            continue  # synthesised on each node that lacks it
        elif not os.path.isabs(value):
            notes.append(f"{key}: {value} is relative; on the cluster it resolves inside the "
                         "job's working directory, where it does not exist. Use an absolute "
                         "path present on every node (image, shared volume) or s3://")
    return cfg, notes


# ----------------------------------------------------------------------------------- output


def check_output(cfg: RunConfig, local_cluster: bool, resume: bool) -> str:
    """Probe the output from here where this machine sees what the cluster sees; a note.

    Raises:
        StorageError: the output cannot be written.
        ConfigError: it holds a run already (fresh run) or no unfinished run (``resume``).
    """
    from pipeline.storage.filesystem import StorageError, fast_fail_options
    from pipeline.storage.run_dir import RunDir
    from pipeline.storage.shard_writer import preflight_writable

    out, opts = cfg.output.dir.rstrip("/"), cfg.output.storage_options
    if not is_uri(out) and not local_cluster:
        return f"output {out}: checked on the cluster when the job starts"
    try:
        preflight_writable(out, fast_fail_options(out, opts))
    except StorageError as exc:
        hint = (" (checked from this machine; if only the cluster has credentials for it, "
                "pass --no-output-check)") if is_uri(out) else ""
        raise StorageError(f"{exc}{hint}") from None
    run = RunDir(out, opts)
    if resume:
        if not run.exists("config.yaml"):
            raise ConfigError(f"--resume {out}: no config.yaml there; is it a bsgal run "
                              "folder?")
        if run.exists("summary.json"):
            raise ConfigError(f"--resume {out}: that run already finished (summary.json)")
    else:
        for marker in ("config.yaml", "checkpoints", "shards"):
            if run.exists(marker):
                raise ConfigError(f"output.dir: {out} already holds a run ({marker}); "
                                  f"continue it with `bsgal submit --resume {out}` or choose "
                                  "another output.dir")
    return f"output {out}: writable"


# ---------------------------------------------------------------------------------- package


def package_job(dest: Path, config_text: str | None, include_code: bool,
                ship: dict[str, Path]) -> int:
    """Write the job's working directory into ``dest``; its size in bytes.

    Raises:
        ConfigError: the folder exceeds :data:`MAX_PACKAGE_BYTES`.
    """
    from pipeline.paths import code_root

    dest.mkdir(parents=True, exist_ok=True)
    if include_code:
        root = Path(code_root())
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in PACKAGES:
            shutil.copytree(root / name, dest / name, ignore=ignore)
    if config_text is not None:
        (dest / CONFIG_NAME).write_text(config_text)
    for name, source in ship.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_PACKAGE_BYTES:
        raise ConfigError(f"the job's working directory would be {size / 2**20:.0f} MiB "
                          f"(limit {MAX_PACKAGE_BYTES // 2**20} MiB); files named by the "
                          "config are too big to upload: put them on the cluster or s3://")
    return size


# ------------------------------------------------------------------------------- submission


def forwarded_env(names: Sequence[str]) -> dict[str, str]:
    """``--env NAME`` (value from this environment) or ``--env NAME=VALUE`` as env vars."""
    env: dict[str, str] = {}
    for item in names:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--env {name!r}: not an environment variable name")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this environment")
            value = os.environ[name]
        env[name] = value
    return env


def new_submission_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "run"
    return f"bsgal-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _credential_keys(cfg: RunConfig) -> list[str]:
    from pipeline.storage.redaction import REDACTED, redact

    def walk(options: dict[str, Any], prefix: str) -> list[str]:
        keys: list[str] = []
        for key, value in options.items():
            if value == REDACTED:
                keys.append(f"{prefix}.{key}")
            elif isinstance(value, dict):
                keys += walk(value, f"{prefix}.{key}")
        return keys

    return [key for section in ("data", "output")
            for key in walk(redact(getattr(cfg, section).storage_options),
                            f"{section}.storage_options")]


def build_submission(config_path: str | None, overrides: Sequence[str], *, workdir: Path,
                     local_cluster: bool, resume_out: str | None = None,
                     image_has_code: bool = False, env: Sequence[str] = (),
                     job_id: str | None = None, cwd: Path | None = None
                     ) -> tuple[Submission, RunConfig | None]:
    """The job for ``config_path`` + ``overrides`` (or for continuing ``resume_out``).

    Returns the submission and the config the job will run (None when resuming a run whose
    config this machine cannot read: a local folder on a remote cluster). Nothing is checked
    against the cluster or the output here (:func:`check_output`,
    :func:`pipeline.cluster.capacity.check_capacity`).
    """
    cwd = cwd or Path.cwd()
    notes: list[str] = []
    ship: dict[str, Path] = {}
    env_vars = {"PYTHONUNBUFFERED": "1", **forwarded_env(env)}
    if resume_out is None:
        if config_path is None:
            raise ConfigError("give --config FILE (e.g. configs/lvis_sd_sam.yaml) or "
                              "--resume OUT")
        cfg: RunConfig | None = load_config(config_path, overrides)
        assert cfg is not None
        cfg = set_key(cfg, "ray.address", "auto")
        cfg, path_notes = localize_paths(cfg, local_cluster, cwd, ship)
        notes += path_notes
        secrets = _credential_keys(cfg)
        if secrets:
            notes.append(f"{', '.join(secrets)}: credentials in the config travel to the "
                         "cluster inside the job's working directory; prefer an instance "
                         "profile / IRSA, or --env AWS_ACCESS_KEY_ID --env "
                         "AWS_SECRET_ACCESS_KEY")
        config_text: str | None = dump_config(cfg)
        args = ["run", "--config", CONFIG_NAME, "--progress", "lines"]
        out, name = cfg.output.dir, cfg.name
    else:
        from pipeline.storage.redaction import is_secret_key
        from pipeline.storage.run_config import resume_config

        out = resume_out.rstrip("/")
        if not is_uri(out):
            if local_cluster:
                out = str((cwd / out).resolve())
            elif not os.path.isabs(out):
                raise ConfigError(f"--resume {out}: a relative path; give the run folder as "
                                  "the cluster sees it (absolute path or s3://)")
        for text in overrides:
            key = text.split("=", 1)[0].lower()
            if "storage_options" in key and is_secret_key(key.rsplit(".", 1)[-1]):
                raise ConfigError(f"override {key}: credentials on the command line are "
                                  "shown in the job's entrypoint; pass them with --env")
        cfg = None
        if is_uri(out) or local_cluster:
            cfg = resume_config(out, overrides)
        else:
            notes.append(f"--resume {out}: read and checked on the cluster when the job starts")
        config_text = None
        args = ["run", "--resume", out, "--progress", "lines", "ray.address=auto", *overrides]
        name = cfg.name if cfg is not None else Path(out).name
    size = package_job(workdir, config_text, not image_has_code, ship)
    notes.append(f"working dir: {size / 1024:.0f} KiB "
                 + ("(config only; the image's bsgal runs it)" if image_has_code
                    else "(this checkout's code + the resolved config)"))
    entrypoint = shlex.join(["python", "-m", "pipeline.cli", *args])
    from importlib import metadata

    try:
        version = metadata.version("bsgal")
    except metadata.PackageNotFoundError:
        version = "unknown"
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if any(workdir.iterdir()):  # empty when resuming with the image's code
        runtime_env["working_dir"] = str(workdir)
    submission = Submission(
        submission_id=job_id or new_submission_id(name),
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"bsgal_out": out, "bsgal_name": name, "bsgal_version": version},
        out=out,
        working_dir=workdir,
        notes=notes,
    )
    return submission, cfg


def submit(client: Any, submission: Submission) -> str:
    """Send ``submission`` to the Job server; the job id."""
    from pipeline.cluster.job_client import JobServerError

    try:
        return client.submit_job(entrypoint=submission.entrypoint,
                                 submission_id=submission.submission_id,
                                 runtime_env=submission.runtime_env,
                                 metadata=submission.metadata)
    except (RuntimeError, OSError) as exc:  # an HTTP error, or the connection lost (requests)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise JobServerError(f"the Job server did not take the job: {lines[0]}") from None

"""The config a run folder was started with: written once, read back by ``--resume``.

``OUT/config.yaml`` holds the resolved config with its credentials redacted
(:mod:`pipeline.storage.redaction`). :func:`resume_config` reads it back, lets only the keys
that cannot change a decision be overridden, and returns the config to continue with.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import yaml

from pipeline.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from pipeline.storage.checkpoints import decision_keys
from pipeline.storage.redaction import drop_redacted, redacted_config
from pipeline.storage.run_dir import RunDir

CONFIG_NAME = "config.yaml"


def write_run_config(run: RunDir, cfg: RunConfig) -> None:
    """``OUT/config.yaml``: the resolved config of a new run, credentials redacted."""
    run.write_text(CONFIG_NAME, yaml.safe_dump(redacted_config(cfg), sort_keys=False))


def resume_config(out: str, overrides: Sequence[str] = (),
                  storage_options: dict[str, Any] | None = None, *,
                  also_allowed: Sequence[str] = (), flag: str = "--resume") -> RunConfig:
    """The config of the run in ``out`` with the allowed ``overrides`` applied.

    Only keys that cannot change a decision may be overridden (``ray.*``, storage options,
    logging); anything else is a :class:`ConfigError` naming the key. A run with no
    checkpoint yet decided nothing that is kept: any key may change (the retry of a run that
    failed to start), and :func:`resume_job` records the new config. ``also_allowed``: more
    key prefixes the caller lets change (``bsgal rescore``: what describes its source), named
    in the message as ``flag``'s.
    """
    run = RunDir(out, storage_options or {})
    if not run.exists(CONFIG_NAME):
        raise ConfigError(f"--resume {out}: no {CONFIG_NAME} there; is it a bsgal run folder?")
    data = yaml.safe_load(run.read_bytes(CONFIG_NAME))
    for section in ("data", "output"):
        data[section]["storage_options"] = drop_redacted(data[section].get("storage_options")
                                                         or {})
    if storage_options:
        data["output"]["storage_options"] = {**data["output"]["storage_options"],
                                             **storage_options}
    before = config_from_dict(copy.deepcopy(data))
    after = config_from_dict(apply_overrides(data, overrides))
    old, new = decision_keys(before), decision_keys(after)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                     and not k.startswith(tuple(also_allowed)))
    if changed and run.latest_checkpoint() is not None:
        extra = f", {', '.join(also_allowed)}" if also_allowed else ""
        raise ConfigError(
            f"{flag}: {', '.join(changed)} cannot change here (it changes which candidates "
            "are made or how they are judged); only ray.*, output/data storage_options and "
            f"logging keys{extra} may. Start a new run in another output.dir instead")
    return dataclasses.replace(after, output=dataclasses.replace(after.output, dir=out))

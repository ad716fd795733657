"""Run checkpoints: the trainer's state plus where each worker stands in the candidate stream.

One checkpoint at step N is up to three kinds of files under ``OUT/checkpoints``::

    step-00000N.rank001.pt   rank r > 0: that worker's own state (gradient cache, threshold,
                             samplers, copy-paste and global RNG states, stream offset)
    step-00000N.json         every rank's pipeline state (stream offset, counters): read by
                             the driver on resume without loading tensors
    step-00000N.pt           rank 0's whole trainer state (model, optimizer, scheduler, EMA,
                             and its own per-rank parts) + the pipeline states: written last

The ``.pt`` file is the commit point (:meth:`pipeline.storage.run_dir.RunDir.latest_checkpoint` only
lists those); the other files of step N are written before it. Model and optimizer are the same
on every rank under DDP, so only rank 0 saves them; the BSGAL cache, threshold and samplers are
per worker (the reference's per-GPU caches) and each rank saves its own. Every file loads with
``torch.load(weights_only=True)``. Decision shards are flushed before any of it is written, so
a checkpoint never refers to rows that are not durable.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Any

from pipeline.config import RunConfig, config_to_dict
from pipeline.storage.run_dir import RunDir

FORMAT = "bsgal-run/1"
#: Parts of `DetectorTrainer.state_dict` that differ between ranks.
PER_RANK_KEYS = ("stream_offset", "selector", "sampler", "test_sampler", "copy_paste", "rng")
#: Config keys that may change on resume (they do not change any decision).
RESUMABLE_KEYS = ("ray.", "output.storage_options", "output.shard_flush_seconds",
                  "output.log_every", "output.keep_checkpoints", "data.storage_options",
                  "training.prefetch_batches", "training.eval_every",
                  # Where the stages run, not what they compute.
                  "generation.resources", "annotation.resources",
                  "training.resources_per_worker")
_STEP_FILE = re.compile(r"^step-(\d{9})(?:\.rank\d{3}\.pt|\.json)$")


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "storage_options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: Keys added after runs were already checkpointed, at the value those runs ran with: left out
#: of the hash at that value, so that a run checkpointed before the key existed resumes.
LATER_KEYS_AT_THEIR_OLD_VALUE = {"generation.weights": "pretrained",
                                 "annotation.weights": "pretrained",
                                 "training.weights": "pretrained"}


def decision_keys(cfg: RunConfig) -> dict[str, Any]:
    """The flat config keys a resumed run must keep (all but :data:`RESUMABLE_KEYS`)."""
    flat = _flat(config_to_dict(cfg))
    return {k: v for k, v in flat.items()
            if k != "output.dir" and not k.startswith(RESUMABLE_KEYS)
            and not (k in LATER_KEYS_AT_THEIR_OLD_VALUE
                     and v == LATER_KEYS_AT_THEIR_OLD_VALUE[k])}


def config_hash(cfg: RunConfig) -> str:
    """Hash of :func:`decision_keys` (stored in checkpoints, checked on resume)."""
    text = json.dumps(decision_keys(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rank_name(step: int, rank: int) -> str:
    return f"checkpoints/step-{step:09d}.rank{rank:03d}.pt"


def json_name(step: int) -> str:
    return f"checkpoints/step-{step:09d}.json"


def per_rank_state(trainer_state: dict[str, Any]) -> dict[str, Any]:
    return {k: trainer_state[k] for k in PER_RANK_KEYS}


def save_rank_state(run: RunDir, step: int, rank: int, trainer_state: dict[str, Any]) -> None:
    """Rank ``rank`` > 0: write its own parts of the trainer state for step ``step``."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, "rank": rank,
                "trainer": per_rank_state(trainer_state)}, buf)
    run.write_bytes(rank_name(step, rank), buf.getvalue())


def save_main(run: RunDir, step: int, trainer_state: dict[str, Any],
              pipelines: list[dict[str, Any]], cfg_hash: str, keep: int) -> str:
    """Rank 0, after every other rank saved its part: the JSON, then the commit ``.pt``; then
    remove the files of checkpoints no longer kept. Returns the ``.pt`` name."""
    info = {"format": FORMAT, "step": step, "world_size": len(pipelines),
            "config_hash": cfg_hash, "ranks": pipelines}
    run.write_json(json_name(step), info)
    name = run.save_checkpoint(step, {**info, "trainer": trainer_state}, keep=keep)
    kept = {s for s, _ in run.list_checkpoints()}
    folder = run.path_of("checkpoints")
    for path in run.fs.ls(folder, detail=False):
        m = _STEP_FILE.match(path.rsplit("/", 1)[-1])
        if m and int(m.group(1)) not in kept:
            run.fs.rm(path)
    return name


def read_info(run: RunDir, name: str) -> dict[str, Any]:
    """The JSON part of checkpoint ``name`` (``checkpoints/step-N.pt``)."""
    step = int(re.search(r"step-(\d{9})\.pt$", name).group(1))  # type: ignore[union-attr]
    return run.read_json(json_name(step))


def load_trainer_state(run: RunDir, name: str, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s trainer state at checkpoint ``name``: rank 0's shared parts with its
    own per-rank parts."""
    main = run.load_checkpoint(name)
    if main.get("format") != FORMAT:
        raise ValueError(f"{run.uri(name)}: format {main.get('format')!r} is not {FORMAT!r}")
    state = dict(main["trainer"])
    if rank > 0:
        own = run.load_checkpoint(rank_name(int(main["step"]), rank))
        state.update(own["trainer"])
    return state


def checkpoint_problem(run: RunDir, name: str) -> str | None:
    """Why checkpoint ``name`` (``checkpoints/step-N.pt``) cannot be resumed from, or None: its
    ``.pt`` must be a whole torch archive (every member's CRC checked) and its JSON part must
    parse. Reads the file once and loads no tensor."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(run.read_bytes(name))) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"member {bad} is corrupt"
        read_info(run, name)
    except zipfile.BadZipFile:
        return "not a whole torch archive: truncated or overwritten"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def newest_readable_checkpoint(run: RunDir) -> tuple[str | None, list[str]]:
    """The newest checkpoint that :func:`checkpoint_problem` passes, and one line per newer one
    that it did not. Those are renamed ``step-N.pt.unreadable`` (kept for a look, never listed
    again), so that everything after this resumes from the same checkpoint."""
    set_aside = []
    for _, name in reversed(run.list_checkpoints()):
        problem = checkpoint_problem(run, name)
        if problem is None:
            return name, set_aside
        aside = f"{name}.unreadable"
        run.fs.mv(run.path_of(name), run.path_of(aside))
        set_aside.append(f"{run.uri(name)} cannot be read ({problem}); set aside as "
                         f"{posixpath.basename(aside)}")
    return None, set_aside

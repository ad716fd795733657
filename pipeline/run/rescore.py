"""``bsgal rescore SOURCE --checkpoint CKPT --out OUT``: judge stored candidates again with one
detector state, on Ray, without training; decision shards in ``OUT``.

SOURCE is anything ``generation.backend: pool`` reads (an earlier run's folder or shards, a
``bsgal export-pool`` folder, an X-Paste/DiverGen pool JSON; local or ``s3://``). Every entry
is judged once, in the index's order (``stream_offset`` = that position). CKPT is a
checkpoint file (``RUN/checkpoints/step-N.pt``) or a run folder (its latest checkpoint); the
settings are that run's ``config.yaml`` (its selection, its trainer), of which only keys that
cannot change a decision may be overridden (``ray.*``, storage options), and those that
describe the source (`SOURCE_KEYS`: ``generation.pool_*``, ``selection.quality_gates``).

The graph: source rows ─► pool reader ─► quality checks ─► score (one actor per GPU, or per
``--workers`` CPU actors; `pipeline.run.rescore_stage`) ─► the driver, which applies the
selection's thresholds in stream order from the checkpoint's threshold state
(`trainer.rescore.decide`) and writes one row per entry (:class:`ShardWriter`, rank 0) with
``judged_by`` naming the checkpoint. ``OUT/rescore.json`` records the source, the checkpoint,
its step, the cache mode, the counts and the time taken.
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.config import ConfigError, RunConfig, candidate_batch_size, config_to_dict
from pipeline.errors import UserError
from pipeline.paths import absolute_local
from pipeline.storage.checkpoints import FORMAT, checkpoint_problem, config_hash, read_info
from pipeline.storage.filesystem import check_output_path
from pipeline.storage.run_config import resume_config
from pipeline.storage.run_dir import CHECKPOINT_NAME, RunDir
from pipeline.storage.shard_schema import DECISIONS, shards_root
from pipeline.storage.shard_writer import ShardWriter
from pipeline.storage.shards import list_shard_files

RESCORE_JSON = "rescore.json"


@dataclasses.dataclass(frozen=True)
class RescoreRequest:
    """What ``bsgal rescore`` was asked.

    Attributes:
        source: the candidates (a run, its shards, or a pool).
        checkpoint: a checkpoint file or a run folder (its latest checkpoint).
        out: where the decision shards go (must hold none).
        overrides: ``section.key=value`` for keys that cannot change a decision, or that
            describe the source (`SOURCE_KEYS`).
        decisions: for a run as the source, the partitions to judge again.
        cache: ``real`` or ``checkpoint`` (`trainer.rescore`).
        real_images: real images per class for ``cache=real``.
        workers: scoring actors (default: one per GPU, else one).
        storage_options: fsspec options for the checkpoint's run, the source and ``out``.
    """

    source: str
    checkpoint: str
    out: str
    overrides: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ("accepted", "rejected")
    cache: str = "real"
    real_images: int = 8
    workers: int | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)


#: Keys a rescoring may set although they are the run's decision keys: what describes the
#: source (its format, paths, decisions), and the quality gates (a source that records no mask
#: score cannot pass a mask_score gate: the hint for that case says to clear them).
SOURCE_KEYS = ("generation.pool_", "selection.quality_gates")


def locate_checkpoint(uri: str, storage_options: dict[str, Any]) -> tuple[RunDir, str]:
    """(the run folder, ``checkpoints/step-N.pt``) of a checkpoint file or a run folder."""
    uri = uri.rstrip("/")
    if uri.endswith(".pt"):
        folder, name = posixpath.split(uri)
        if posixpath.basename(folder) != "checkpoints":
            raise UserError(f"--checkpoint {uri}: a bsgal checkpoint lies in RUN/checkpoints/"
                            "step-N.pt (the run's config.yaml is read from RUN)")
        run = RunDir(posixpath.dirname(folder), storage_options)
        if not run.exists(f"checkpoints/{name}"):
            raise UserError(f"--checkpoint {uri}: no such file")
        _check_bsgal_checkpoint(uri, run, f"checkpoints/{name}")
        return run, f"checkpoints/{name}"
    run = RunDir(uri, storage_options)
    latest = run.latest_checkpoint()
    if latest is None:
        raise UserError(f"--checkpoint {uri}: no checkpoint there (give RUN/checkpoints/"
                        "step-N.pt or a run folder that has one)")
    _check_bsgal_checkpoint(uri, run, latest)
    return run, latest


def _check_bsgal_checkpoint(uri: str, run: RunDir, name: str) -> None:
    """A one-line refusal, before any work, of a file that is not a whole bsgal checkpoint
    (e.g. a torchvision ``.pt`` copied into a run, or a truncated one)."""
    expected = ("a bsgal checkpoint is RUN/checkpoints/step-NNNNNNNNN.pt, written by bsgal run "
                "beside its step-NNNNNNNNN.json")
    if not CHECKPOINT_NAME.match(posixpath.basename(name)):
        raise UserError(f"--checkpoint {uri}: not a bsgal checkpoint name ({expected})")
    problem = checkpoint_problem(run, name)
    if problem is not None:
        raise UserError(f"--checkpoint {uri}: {run.uri(name)} cannot be used: {problem} "
                        f"({expected})")
    info = read_info(run, name)
    if info.get("format") != FORMAT:
        raise UserError(f"--checkpoint {uri}: format {info.get('format')!r} is not "
                        f"{FORMAT!r} ({expected})")


def rescore_config(request: RescoreRequest, run: RunDir) -> RunConfig:
    """The checkpoint's run config, ``out`` as its output, ``source`` as its pool."""
    cfg = resume_config(run.out, request.overrides, request.storage_options or None,
                        also_allowed=SOURCE_KEYS, flag="rescore")
    if cfg.selection.granularity != "instance" or cfg.selection.method == "none":
        raise ConfigError(f"--checkpoint: the run in {run.out} decides per batch "
                          f"(selection.granularity={cfg.selection.granularity}, method="
                          f"{cfg.selection.method}); rescoring judges candidates one by one "
                          "and needs a run with selection.granularity=instance")
    out_opts = {**cfg.output.storage_options, **request.storage_options}
    # The source's format: auto, unless the command names one (generation.pool_format=...).
    named = [o.split("=", 1)[1].strip() for o in request.overrides
             if o.split("=", 1)[0].strip() == "generation.pool_format"]
    generation = dataclasses.replace(
        cfg.generation, backend="pool", pool=request.source,
        pool_format=named[-1] if named else "auto",
        pool_decisions=list(request.decisions),
        pool_storage_options={**cfg.generation.pool_storage_options,
                              **request.storage_options})
    return dataclasses.replace(cfg, generation=generation, output=dataclasses.replace(
        cfg.output, dir=request.out, storage_options=out_opts))


def comparable_judgement(source_format: str, source: str,
                         storage_options: dict[str, Any]) -> str | None:
    """The judgement a rescoring of ``source`` can be compared with on ``sample_id``: the
    source run itself (shards), the run a ``bsgal export-pool`` folder came from (its
    export.json; its entries carry that run's sample ids), or None (an X-Paste or images pool:
    no earlier judgement of these candidates)."""
    if source_format == "shards":
        return source
    if source_format == "bsgal":
        folder = source[: -len("/pool.json")] if source.endswith("/pool.json") else source
        try:
            return str(RunDir(folder.rstrip("/"), storage_options).read_json("export.json")
                       ["source"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _check_fresh(out: str, storage_options: dict[str, Any]) -> None:
    check_output_path(out, storage_options, kind="folder", option="--out")
    if list_shard_files(shards_root(out), storage_options):
        raise UserError(f"--out {out} already holds decision shards; choose a new folder")


def rescore(request: RescoreRequest, *, connect: Callable[[RunConfig], Any],
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the rescoring (module docstring); returns what ``rescore.json`` holds.

    ``connect`` is :func:`pipeline.cluster.connect.connect` (the entry passes it in).
    """
    import ray

    from generators.columns import reason_kind
    from pipeline.run.costs import stage_devices, units_text
    from pipeline.run.datasets import train_categories
    from pipeline.run.graph import (
        StageSpec,
        build_candidate_dataset,
        configure_data_context,
        stage_specs,
    )
    from pipeline.run.pool_source import pool_draws
    from pipeline.run.progress import CountProgress, start_board
    from pipeline.run.rescore_stage import STREAM_OFFSET, RescoreStage, restored_trainer
    from pipeline.run.rows import decision_row
    from trainer.candidates import batch_rows
    from trainer.rescore import CACHE_MODES, decide

    if request.cache not in CACHE_MODES:
        raise UserError(f"--cache {request.cache!r} is not one of {CACHE_MODES}")
    bad = [d for d in request.decisions if d not in DECISIONS]
    if bad:
        raise UserError(f"--decision {bad}: not among {DECISIONS}")
    started = time.monotonic()
    # The scoring actors run in folders of their own: local paths are resolved here.
    request = dataclasses.replace(request, **{
        k: absolute_local(getattr(request, k)) for k in ("source", "checkpoint", "out")})
    run, name = locate_checkpoint(request.checkpoint, request.storage_options)
    cfg = rescore_config(request, run)
    run_hash = config_hash(resume_config(run.out, request.overrides,
                                         request.storage_options or None,
                                         also_allowed=SOURCE_KEYS, flag="rescore"))
    _check_fresh(cfg.output.dir, cfg.output.storage_options)
    step = int(read_info(run, name)["step"])
    judged_by = f"{run.uri(name)}@step{step}"
    categories = train_categories(cfg.data)
    frequency = {int(c["id"]): str(c.get("frequency", "")) for c in categories}
    draws = pool_draws(cfg, categories)
    rows = draws.every_entry()
    compare_with = comparable_judgement(draws.index.format, request.source,
                                        cfg.generation.pool_storage_options)
    n = len(rows["sample_id"])
    rows[STREAM_OFFSET] = np.arange(n, dtype=np.int64)
    # The driver's copy decides (thresholds in stream order); it checks the checkpoint first.
    driver = restored_trainer(cfg, run, name, device="cpu")
    echo(f"rescoring {n} candidates of {request.source} with {judged_by} "
         f"(cache: {request.cache})")

    conn = connect(cfg)
    try:
        configure_data_context(dataclasses.replace(
            cfg, ray=dataclasses.replace(cfg.ray, preserve_order=True)), conn.cpus)
        size = candidate_batch_size(cfg)
        gpus = 1.0 if conn.gpus >= 1 else 0.0  # GPU where present
        workers = request.workers or max(1, int(conn.gpus) if gpus else 1)
        # Every stage takes batches of one size, so a scored batch is one source block and
        # its first stream offset (which seeds its paste context) does not depend on timing.
        specs = [dataclasses.replace(s, batch_size=size) for s in stage_specs(cfg, categories)]
        specs.append(StageSpec(
            "score", RescoreStage,
            {"config": config_to_dict(cfg), "run_uri": run.out, "checkpoint": name,
             "cache": request.cache, "real_images": request.real_images},
            size, workers, float(cfg.training.num_cpus_per_worker), gpus))
        board = start_board()
        ds = build_candidate_dataset(cfg, rows, categories, specs=specs, progress=board)
        devices = stage_devices(cfg, gpus > 0)  # the score stage holds what the trainer would
        units = units_text(devices)
        counts = dict.fromkeys(DECISIONS, 0)
        writer = ShardWriter(cfg.output.dir, rank=0, max_rows=cfg.output.shard_max_rows,
                             flush_seconds=cfg.output.shard_flush_seconds,
                             storage_options=cfg.output.storage_options)
        shown = CountProgress(n, "rescored", board)
        with writer:
            for batch in ds.iter_batches(batch_size=size, batch_format="numpy"):
                batch_list = batch_rows(batch)
                first = int(batch[STREAM_OFFSET][0])
                scored = [{k: r[k] for k in ("pre_reason", "score", "cache_norm")}
                          for r in batch_list]
                decisions = decide(driver.selector, batch_list, scored, step=step,
                                   first_offset=first, batch_id=f"rescore-{first}",
                                   method=driver.method)
                out_rows = []
                for row, d in zip(batch_list, decisions):
                    counts[reason_kind(d["reason"])] += 1
                    out_rows.append(decision_row(row, d, run_id=f"rescore:{cfg.name}",
                                                 frequency=frequency, devices=devices,
                                                 units=units, judged_by=judged_by))
                writer.add(out_rows)
                shown.update(len(out_rows))
        shown.close()
    finally:
        if conn.started:
            ray.shutdown()
    info = {"source": request.source, "checkpoint": run.uri(name), "step": step,
            "judged_by": judged_by, "config_hash": run_hash, "cache": request.cache,
            "real_images": request.real_images, "decisions_judged": list(request.decisions),
            "candidates": n, "counts": counts, "workers": workers, "gpus_per_worker": gpus,
            "seconds": time.monotonic() - started, "compare_with": compare_with}
    RunDir(cfg.output.dir, cfg.output.storage_options).write_json(RESCORE_JSON, info)
    return info

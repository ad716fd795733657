"""Checks of a run config that types alone cannot express: ranges, cross-key rules, and the
keys each registered backend, method and check reads (their own checks, beside their code)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pipeline.config.derived import candidate_batch_size, min_read_ahead
from pipeline.config.sections import (
    POOL_BACKEND,
    GenerationConfig,
    RunConfig,
    SelectionConfig,
)
from pipeline.errors import ConfigError, did_you_mean


#: The range of every numeric key the other checks do not cover: key -> (lowest, highest,
#: whether the lowest itself is allowed); None: no bound on that side. NaN is never allowed.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "data.max_val_images": (0, None, True),
    "data.synth_num_classes": (1, None, True),
    "data.synth_train_images": (1, None, True),
    "data.synth_val_images": (1, None, True),
    "data.synth_image_size": (16, None, True),
    "generation.steps": (1, None, True),
    "generation.guidance": (0, None, True),
    "generation.resolution": (64, None, True),
    "generation.image_size": (16, None, True),
    "generation.pool_fill": (0, 1, False),
    "selection.fixed_threshold": (None, None, True),
    "selection.quality_threshold": (None, None, True),
    "selection.topup_images": (0, None, True),
    "selection.cache_max_age": (0, None, True),
    "selection.sketch_rank": (1, None, True),
    "selection.basis_images": (1, None, True),
    "selection.basis_refresh_steps": (0, None, True),
    "selection.cache_memory_mb": (0, None, False),
    "training.image_size": (32, None, True),
    "training.weight_decay": (0, None, True),
    "training.momentum": (0, 1, True),
    "training.warmup_steps": (0, None, True),
    "training.grad_clip": (0, None, True),
    "training.max_pastes_per_image": (0, None, True),
    "training.repeat_factor_threshold": (0, None, True),
    "feedback.floor": (0, 1, True),
    "feedback.half_life": (0, None, False),
    "feedback.temperature": (0, None, False),
    "feedback.exploration": (0, 1, True),
    "feedback.timeout_s": (0, None, False),
    "feedback.max_ahead": (0, None, True),
    "feedback.max_wait_s": (0, None, False),
    "output.shard_flush_seconds": (0, None, False),
    "output.keep_checkpoints": (0, None, True),
}


def _check_ranges(cfg: RunConfig) -> None:
    """Every key of :data:`RANGES` in its range (one message naming the key, the value and the
    range)."""
    for key, (low, high, low_ok) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        bad = value != value  # NaN
        if low is not None:
            bad = bad or value < low or (value == low and not low_ok)
        if high is not None:
            bad = bad or value > high
        if bad:
            lower = "" if low is None else f"{'>=' if low_ok else '>'} {low:g}"
            upper = "" if high is None else f"<= {high:g}"
            wanted = " and ".join(p for p in (lower, upper) if p) or "a number"
            raise ConfigError(f"{key}: must be {wanted}, got {value}")
    if cfg.generation.resolution % 8:
        raise ConfigError(f"generation.resolution: Stable Diffusion needs a multiple of 8 "
                          f"pixels, got {cfg.generation.resolution}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    _check_ranges(cfg)

    def positive(value: float, key: str) -> None:
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")

    def fraction(value: float, key: str) -> None:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be within [0, 1], got {value}")

    _check_output_dir(cfg.output.dir)
    positive(cfg.training.steps, "training.steps")
    positive(cfg.training.batch_size, "training.batch_size")
    positive(cfg.training.lr, "training.lr")
    positive(cfg.training.image_size, "training.image_size")
    positive(cfg.training.num_workers, "training.num_workers")
    positive(cfg.generation.batch_size, "generation.batch_size")
    positive(cfg.generation.concurrency, "generation.concurrency")
    positive(cfg.annotation.batch_size, "annotation.batch_size")
    positive(cfg.annotation.concurrency, "annotation.concurrency")
    positive(cfg.selection.window, "selection.window")
    positive(cfg.selection.threshold_window_steps, "selection.threshold_window_steps")
    positive(cfg.selection.calibration_min_reference, "selection.calibration_min_reference")
    positive(cfg.selection.calibration_pastes, "selection.calibration_pastes")
    positive(cfg.selection.real_batch_size, "selection.real_batch_size")
    positive(cfg.output.shard_max_rows, "output.shard_max_rows")
    positive(cfg.output.log_every, "output.log_every")
    positive(cfg.annotation.check_batch_size, "annotation.check_batch_size")
    positive(cfg.annotation.check_concurrency, "annotation.check_concurrency")
    positive(cfg.training.num_cpus_per_worker, "training.num_cpus_per_worker")
    for key in ("warmup_real_steps", "candidate_batch_size", "prefetch_batches",
                "checkpoint_every", "eval_every", "max_failures"):
        if getattr(cfg.training, key) < 0:
            raise ConfigError(f"training.{key}: must be >= 0, got {getattr(cfg.training, key)}")
    if cfg.training.warmup_real_steps > cfg.training.steps:
        raise ConfigError(f"training.warmup_real_steps: {cfg.training.warmup_real_steps} real-only "
                          f"steps exceed training.steps ({cfg.training.steps}): every step would be "
                          "real-only and the candidates would only be used in extra steps after "
                          "them; lower training.warmup_real_steps or raise training.steps")
    for key, resources in (("generation.resources", cfg.generation.resources),
                           ("annotation.resources", cfg.annotation.resources),
                           ("training.resources_per_worker", cfg.training.resources_per_worker)):
        for name, amount in resources.items():
            if name in ("CPU", "GPU"):
                raise ConfigError(f"{key}.{name}: set CPUs/GPUs with the num_cpus/num_gpus keys "
                                  "(training: num_cpus_per_worker/use_gpu); resources is for "
                                  "custom resources such as bsgal_generate")
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"{key}.{name}: must be a number >= 0, got {amount!r}")
    for key in ("num_cpus", "num_gpus"):
        for section in ("generation", "annotation"):
            if getattr(getattr(cfg, section), key) < 0:
                raise ConfigError(f"{section}.{key}: must be >= 0")
    if cfg.generation.num_candidates < 0:
        raise ConfigError(
            f"generation.num_candidates: must be >= 0, got {cfg.generation.num_candidates}"
        )
    for key in ("momentum", "keep_fraction", "keep_fraction_start", "keep_fraction_end",
                "rare_min_accept_rate", "random_p"):
        fraction(getattr(cfg.selection, key), f"selection.{key}")
    _check_granularity(cfg.selection)
    fraction(cfg.training.ema, "training.ema")
    fraction(cfg.ray.data_cpu_fraction, "ray.data_cpu_fraction")
    positive(cfg.ray.placement_timeout_s, "ray.placement_timeout_s")
    a = cfg.annotation
    if not 0.0 <= a.min_area_ratio < a.max_area_ratio <= 1.0:
        raise ConfigError(
            "annotation.min_area_ratio/max_area_ratio: need 0 <= min < max <= 1, got "
            f"{a.min_area_ratio} and {a.max_area_ratio}"
        )
    for group in cfg.generation.groups:
        if group not in ("r", "c", "f"):
            raise ConfigError(f"generation.groups: {group!r} is not one of 'r', 'c', 'f'")
    for group, weight in cfg.generation.group_weights.items():
        if group not in ("r", "c", "f"):
            raise ConfigError(
                f"generation.group_weights: key {group!r} is not one of 'r', 'c', 'f'"
            )
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"generation.group_weights.{group}: must be a number >= 0")
    _check_backends(cfg)
    _check_pool(cfg.generation)
    _check_feedback(cfg)


def _check_backends(cfg: "RunConfig") -> None:
    """The stage backends exist, and each finds its own keys well formed."""
    from annotators import ANNOTATORS
    from generators import GENERATORS

    g, a = cfg.generation, cfg.annotation
    if g.backend != POOL_BACKEND and g.backend not in GENERATORS:
        raise ConfigError(GENERATORS.unknown(g.backend, extra=(POOL_BACKEND,)))
    if a.backend not in ANNOTATORS:
        raise ConfigError(ANNOTATORS.unknown(a.backend))
    from annotators.checks import check_settings

    for name, section, claimed in (
            ("generation", g, GENERATORS.options(g.backend) if g.backend in GENERATORS else ()),
            ("annotation", a, (*ANNOTATORS.options(a.backend), *check_settings({})))):
        if not isinstance(section.options, dict):
            raise ConfigError(f"{name}.options: must be a mapping of key to value")
        for key in section.options:
            if key not in claimed:
                raise ConfigError(f"{name}.options.{key}: no {name} backend or check here "
                                  f"reads it{did_you_mean(str(key), claimed)} (they read "
                                  f"{sorted(claimed)})")
    problems = []
    if g.backend != POOL_BACKEND:
        problems += GENERATORS.check_section(g.backend, dataclasses.asdict(g))
    problems += ANNOTATORS.check_section(a.backend, dataclasses.asdict(a))
    if problems:
        raise ConfigError("; ".join(problems))


def feedback_settings(cfg: "RunConfig") -> Any:
    """The ``feedback`` section as :class:`generators.allocation.FeedbackSettings`."""
    from generators.allocation import FeedbackSettings

    f = cfg.feedback
    try:
        return FeedbackSettings(policy=f.policy, template_policy=f.template_policy,
                                targets=dict(f.targets), stop_at_target=f.stop_at_target,
                                floor=f.floor, half_life=f.half_life, temperature=f.temperature,
                                exploration=f.exploration)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_feedback(cfg: "RunConfig") -> None:
    settings = feedback_settings(cfg)
    if cfg.feedback.max_ahead < 0 or not cfg.feedback.max_wait_s > 0:
        raise ConfigError("feedback.max_ahead must be >= 0 (0: automatic) and "
                          "feedback.max_wait_s > 0")
    if not cfg.feedback.timeout_s > 0:
        raise ConfigError(f"feedback.timeout_s: must be > 0 seconds, got {cfg.feedback.timeout_s}")
    templates = cfg.generation.prompt_template
    if isinstance(templates, list) and (not templates or not all(
            isinstance(t, str) and t.strip() for t in templates)):
        raise ConfigError("generation.prompt_template: give a template or a non-empty list of "
                          "them (strings using {name} and/or {definition})")
    floor = min_read_ahead(cfg)
    if settings.closed and 0 < cfg.feedback.max_ahead < floor:
        raise ConfigError(
            f"feedback.max_ahead: {cfg.feedback.max_ahead} candidates ahead of the trainers "
            f"cannot fill the stages' batches and the trainer's (generation.batch_size "
            f"{cfg.generation.batch_size} + annotation.batch_size {cfg.annotation.batch_size} "
            f"+ annotation.check_batch_size {cfg.annotation.check_batch_size} + the candidate "
            f"batch {candidate_batch_size(cfg)} = {floor}): the stream would stall; set it to "
            f"at least {floor}, or 0 (automatic), or lower the batch sizes")
    if settings.closed and cfg.generation.backend == POOL_BACKEND:
        raise ConfigError("feedback: a pool is drawn class-balanced from what it holds; closed-"
                          "loop allocation needs online generation (generation.backend "
                          "procedural or stable_diffusion) or feedback.policy=open_loop")


def _check_pool(g: GenerationConfig) -> None:
    """The pool keys of ``generation`` (only read when ``backend`` is ``pool``)."""
    if g.backend != POOL_BACKEND:
        return
    if not g.pool:
        raise ConfigError("generation.pool: required when generation.backend=pool; give an "
                          "X-Paste pool JSON, a folder written by bsgal export-pool or a run "
                          "folder, e.g. generation.pool=/data/xpaste/pool.json")
    if g.pool_format != "auto":
        from pipeline.storage.pool_index import PoolFormatError, pool_format

        try:
            pool_format(g.pool_format)
        except PoolFormatError as exc:
            raise ConfigError(str(exc)) from None
    if not 0.0 < g.pool_fill <= 1.0:
        raise ConfigError(f"generation.pool_fill: must be within (0, 1], got {g.pool_fill}")
    for d in g.pool_decisions:
        if d not in ("accepted", "rejected", "invalid"):
            raise ConfigError(f"generation.pool_decisions: {d!r} is not accepted, rejected "
                              "or invalid")
    if not g.pool_decisions:
        raise ConfigError("generation.pool_decisions: name at least one of accepted, "
                          "rejected, invalid")


def _check_output_dir(out: str) -> None:
    """``output.dir`` must name a folder of its own: empty, a filesystem root or a bare
    ``s3://`` would scatter the run's files over the current folder or the root."""
    value = out.strip() if isinstance(out, str) else out
    if not value:
        raise ConfigError("output.dir: empty; name the run folder, e.g. output.dir=runs/my-run "
                          "or output.dir=s3://BUCKET/bsgal/run1")
    protocol, sep, rest = value.partition("://")
    if sep:
        if not rest.strip("/"):
            raise ConfigError(f"output.dir: {out!r} names no bucket; use {protocol}://BUCKET/"
                              "PREFIX")
        return
    if os.path.abspath(os.path.expanduser(value)) == os.path.abspath(os.sep):
        raise ConfigError(f"output.dir: {out!r} is the filesystem root; name a folder of its "
                          "own, e.g. output.dir=runs/my-run")


def _check_granularity(sel: SelectionConfig) -> None:
    """The method must exist at the granularity; instance-level options must be well formed."""
    from selector.methods import calibratable, resolved_threshold, selection_method

    try:
        selection_method(sel.granularity, sel.method)
    except ValueError as exc:
        raise ConfigError(f"selection.method: {exc}") from None
    if not 0.0 < sel.alpha < 1.0:
        raise ConfigError(f"selection.alpha: the fraction of good candidates the calibrated "
                          f"threshold may reject must be in (0, 1), e.g. 0.1; got {sel.alpha}")
    spec = selection_method(sel.granularity, sel.method)
    can_calibrate = calibratable(spec, sel.score_parameters)
    threshold = resolved_threshold(sel.granularity, sel.threshold, calibratable=can_calibrate)
    if sel.granularity == "batch" and threshold == "calibrated":
        raise ConfigError("selection.threshold: calibrated judges each candidate against real "
                          "instances of its class; it needs selection.granularity=instance (at "
                          "batch granularity use fixed, dynamic or schedule)")
    if sel.granularity == "instance" and threshold == "schedule":
        raise ConfigError("selection.threshold: schedule ramps a batch-level keep fraction; at "
                          "instance granularity use calibrated, dynamic or fixed")
    if sel.granularity == "instance" and threshold == "calibrated" and spec.thresholded \
            and not can_calibrate:
        raise ConfigError(f"selection.threshold: calibrated scores real instances with the "
                          f"contribution over the box head (methods composite, bsgal with "
                          f"score_parameters=heads); method {sel.method!r} with score_parameters="
                          f"{sel.score_parameters} cannot: set selection.threshold=dynamic")
    if sel.granularity == "instance" and sel.rare_min_accept_rate > 0:
        raise ConfigError("selection.rare_min_accept_rate: a batch-level floor; at instance "
                          "granularity the per-class threshold already keeps keep_fraction of "
                          "every class's candidates (set it to 0)")
    if sel.mode == "efficient":
        raise ConfigError("selection.mode: efficient mode was removed (its head-only batch score "
                          "ranked batches no better than chance: Spearman -0.11 with the exact "
                          "look-ahead); use selection.granularity=instance with method "
                          "composite, or mode=faithful")
    if not isinstance(sel.quality_gates, dict):
        raise ConfigError("selection.quality_gates: must be a mapping of field name to minimum, "
                          f"e.g. {{mask_score: 0.8}}; got {sel.quality_gates!r}")
    for name, minimum in sel.quality_gates.items():
        if not isinstance(minimum, (int, float)) or isinstance(minimum, bool) \
                or minimum != minimum:
            raise ConfigError(f"selection.quality_gates.{name}: must be a number, got "
                              f"{minimum!r}")

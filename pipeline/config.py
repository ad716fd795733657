"""One dataclass tree for a run: loadable from YAML, overridable as ``section.key=value``.

``RunConfig`` is the whole run. Its sections are plain dataclasses whose fields carry the
defaults of the reference set-up where one exists (docs/algorithm.md, Reference training
set-up), so that a YAML file only names what differs. Loading is strict: an unknown key or a
value of the wrong type is a :class:`ConfigError` that names the key and suggests the closest
valid one.

Example::

    cfg = load_config("configs/demo.yaml", ["selection.threshold=dynamic", "training.steps=400"])
    print(dump_config(cfg))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import UserError

SCHEMA_VERSION = 1


class ConfigError(UserError, ValueError):
    """A config file or override is malformed; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Real data: an LVIS-format folder (local or ``s3://``) or the built-in long-tailed set."""

    dataset: Literal["builtin", "lvis"] = "builtin"
    # Folder holding the annotation JSONs and images. For `builtin` it is created on first use
    # with `synth_*` below (deterministic from `synth_seed`).
    root: str = "data/builtin"
    train_json: str = "train.json"
    val_json: str = "val.json"
    # Images are read from `root/image_dir/<file_name>`; for LVIS v1 (no file_name field) the
    # last two parts of `coco_url` are used, e.g. `train2017/000000391895.jpg`.
    image_dir: str = "images"
    # Evaluate on at most this many val images (None: all). Useful for quick checks.
    max_val_images: Optional[int] = None
    synth_seed: int = 0
    synth_num_classes: int = 12
    synth_train_images: int = 600
    synth_val_images: int = 150
    synth_image_size: int = 128
    # An image that does not decode (truncated, not an image, wrong size): "skip" leaves it out
    # of training and evaluation and names it in the summary, so that one bad file among
    # LVIS's 100k does not end a run hours in; "error" stops the run (before it starts when
    # the up-front check finds it: the whole validation split and a sample of training images).
    bad_images: Literal["error", "skip"] = "skip"
    # Storage options passed to fsspec for s3:// roots (e.g. {"endpoint_url": ...}).
    storage_options: dict = field(default_factory=dict)


#: ``generation.backend`` of the other source: an existing instance pool, not a generator.
POOL_BACKEND = "pool"


@dataclass
class GenerationConfig:
    """Text-to-image generation of candidate objects (Ray Data stage 1)."""

    # A generator backend of generators/__init__.py (procedural, stable_diffusion): generate
    # online; pool: draw from an existing instance pool (the `pool*` keys below),
    # class-balanced, cycled over epochs.
    backend: str = "procedural"
    # Keys of a generator backend outside the built-in set (checked by that backend).
    options: dict = field(default_factory=dict)
    # Hub id or local folder of a diffusers text-to-image pipeline (SD 1.x/2.x/SDXL).
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    scheduler: Literal["dpm_multistep", "ddim", "euler", "pndm", "default"] = "dpm_multistep"
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    safety_checker: bool = False
    # One template or a list of them ({name}, {definition}); with several, each class's
    # prompt is drawn among them (uniformly, or steered by feedback.template_policy).
    prompt_template: Union[str, list] = (
        "a photo of a single {name}, {definition}, in a white background")
    # Optional JSON file {class_name: [prompt, ...]} of extra prompts per class.
    extra_prompts: Optional[str] = None
    class_weighting: Literal["uniform", "rare_boost", "inverse_frequency", "external"] = (
        "rare_boost"
    )
    # Relative sampling weight per LVIS frequency group for `rare_boost`.
    group_weights: dict = field(default_factory=lambda: {"r": 4.0, "c": 2.0, "f": 1.0})
    # Optional JSON file {class_name_or_id: weight} for `external` weighting.
    external_weights: Optional[str] = None
    # Restrict generation to these frequency groups (LVIS letters r/c/f).
    groups: list = field(default_factory=lambda: ["r", "c", "f"])
    num_candidates: int = 1000
    batch_size: int = 8
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # Custom Ray resources each generation actor asks for, e.g. {bsgal_generate: 0.01}: pins
    # the pool to the node type that advertises the resource (deploy/cluster.yaml).
    resources: dict = field(default_factory=dict)
    # Built-in procedural generator only: image side (px) and how often it fails.
    image_size: int = 128
    failure_rates: dict = field(
        default_factory=lambda: {"wrong_class": 0.1, "broken": 0.1, "clutter": 0.1, "noise": 0.1}
    )
    # Built-in generator only: {class name or id: total failure rate} for classes that fail
    # more (or less) often, and one multiplier per prompt option on it (benchmarks/feedback.py).
    failure_by_class: dict = field(default_factory=dict)
    failure_by_option: list = field(default_factory=list)
    # backend=pool: the pool, local or s3://: an X-Paste/DiverGen pool JSON ({"<LVIS id - 1>":
    # ["*cut-out.png" | "img|mask" | "rgba.png", ...]}), a folder written by bsgal export-pool
    # (its pool.json), or an earlier run's folder (its decision shards). The candidates are
    # placed on image_size x image_size white canvases, longer side pool_fill x image_size.
    pool: Optional[str] = None
    # images: ROOT/<class name>/<image> without masks, cut out by the annotation stage (never
    # guessed by auto).
    # auto (never guesses images) or a format of pipeline/storage/pool_index.py: xpaste |
    # bsgal | shards | images.
    pool_format: str = "auto"
    # Shards pools: which decisions of the earlier run are the pool.
    pool_decisions: list = field(default_factory=lambda: ["accepted"])
    # {old path prefix: new prefix} applied to the pool's entry paths (e.g. an X-Paste JSON
    # built on another machine, its images synced to s3://bucket/pool).
    pool_path_map: dict = field(default_factory=dict)
    pool_fill: float = 0.8
    # fsspec options for an s3:// pool (e.g. {"endpoint_url": ...}).
    pool_storage_options: dict = field(default_factory=dict)


@dataclass
class AnnotationConfig:
    """Mask annotation of generated images (Ray Data stage 2) and quality checks."""

    # An annotator backend of annotators/__init__.py: builtin, sam.
    backend: str = "builtin"
    # Keys of the annotator backend that are not section keys (checked by that backend; the
    # builtin annotator takes threshold and border).
    options: dict = field(default_factory=dict)
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    sam_checkpoint: Optional[str] = None
    prompt: Literal["corners", "box", "point"] = "corners"
    batch_size: int = 8
    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # Custom Ray resources each annotation actor asks for, e.g. {bsgal_annotate: 0.01}.
    resources: dict = field(default_factory=dict)
    # The quality-check stage (its own actor pool after the annotator; CLIP scoring may want a
    # GPU). Cheap CPU checks want batches of ~64-128 rows under Ray Data.
    check_batch_size: int = 64
    check_concurrency: int = 1
    check_num_cpus: float = 0.25
    check_num_gpus: float = 0.0
    # Quality checks (X-Paste's defaults).
    min_area_ratio: float = 0.05
    max_area_ratio: float = 0.95
    largest_component: bool = True
    reject_border_touch: bool = False
    clip_score: bool = False
    clip_model: str = "openai/clip-vit-base-patch32"


@dataclass
class SelectionConfig:
    """How generated instances are judged (selector/)."""

    # batch: one decision per step's pasted batch (the paper); instance: one per candidate.
    granularity: Literal["batch", "instance"] = "batch"
    # The methods of each granularity are those of selector/methods.py: batch: bsgal |
    # accept_all | random | field_threshold | lookahead | none; instance: composite | bsgal |
    # quality_gate | loss | gated_loss | accept_all | random | none.
    method: str = "bsgal"
    # faithful: the reference's three passes (batch level). "efficient" was removed (its score
    # ranked no better than chance); it is still parsed so that the error can say so.
    mode: Literal["faithful", "efficient"] = "faithful"
    score: Literal["cosine", "dot"] = "cosine"
    cache_update: Literal["momentum", "average"] = "momentum"
    # Weight kept on the old cache: new = m * old + (1 - m) * current (reference m = 0.1).
    momentum: float = 0.1
    cache_dtype: Literal["float32", "bfloat16"] = "float32"
    # per_worker: the reference's separate cache per GPU; all_reduce: averaged real gradient.
    cache_sync: Literal["per_worker", "all_reduce"] = "per_worker"
    threshold: Literal["fixed", "dynamic", "schedule"] = "fixed"
    fixed_threshold: float = -0.05
    keep_fraction: float = 0.5
    keep_fraction_start: float = 0.5
    keep_fraction_end: float = 0.5
    window: int = 1000
    # Per-class option: keep at least this acceptance rate for rare classes (0 disables).
    rare_min_accept_rate: float = 0.0
    random_p: float = 0.5
    quality_field: str = "mask_score"
    quality_threshold: float = 0.5
    # Real "test" images per worker batch (reference: 4; instance granularity draws at least
    # one per candidate class).
    real_batch_size: int = 4
    # Instance granularity: hard minimums on candidate fields (quality_gate, composite).
    quality_gates: dict = field(default_factory=lambda: {"mask_score": 0.8})
    # Instance granularity: contribution gradients over the box head + predictor ("heads") or
    # all trainable parameters ("all"); class caches' update rule; the threshold is always the
    # percentile keeping keep_fraction of the last `window` scores, per class or pooled.
    score_parameters: Literal["heads", "all"] = "heads"
    class_cache_update: Literal["momentum", "average"] = "average"
    per_class_threshold: bool = True


@dataclass
class TrainingConfig:
    """The detector being trained and its loop (trainer/)."""

    backend: Literal["torchvision", "detectron2"] = "torchvision"
    # small: CPU configuration (resnet18 + thin FPN, 128 px); resnet50_fpn: real runs.
    arch: Literal["small", "resnet50_fpn"] = "small"
    image_size: int = 128
    batch_size: int = 4
    steps: int = 300
    # Steps on real data only before generated candidates are consumed.
    warmup_real_steps: int = 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 10.0
    ema: float = 0.0
    max_pastes_per_image: int = 3
    repeat_factor_threshold: float = 0.001
    eval_every: int = 0
    checkpoint_every: int = 100
    # Start from these weights (a checkpoint written by bsgal, or a torchvision/detectron2 file).
    init_checkpoint: Optional[str] = None
    device: str = "auto"
    amp: bool = False
    # Ray Train workers (DDP when > 1) and whether each takes a GPU.
    num_workers: int = 1
    use_gpu: bool = False
    # CPUs reserved for each Ray Train worker (also its torch thread count, at least 1).
    num_cpus_per_worker: float = 1.0
    # Custom Ray resources each train worker asks for, e.g. {bsgal_train: 0.01}.
    resources_per_worker: dict = field(default_factory=dict)
    # Candidates handed to `train_on_candidates` at a time (0: batch_size x
    # max_pastes_per_image); checkpoints fall between such batches.
    candidate_batch_size: int = 0
    # Candidate batches the worker's iterator fetches ahead of the training step.
    prefetch_batches: int = 2
    # When no candidate batch is ready: "wait" for it (decisions do not depend on timing; exact
    # resume) or take a "real_step" meanwhile (no idle accelerator; timing-dependent).
    late_candidates: Literal["wait", "real_step"] = "wait"


@dataclass
class OutputConfig:
    """Where the run folder (config, metrics, checkpoints, decision shards) is written."""

    # Local folder or s3://bucket/prefix.
    dir: str = "runs/demo"
    shard_max_rows: int = 256
    shard_flush_seconds: float = 30.0
    # A window summary (acceptance, score quantiles, wait time, stage rates) every N steps.
    log_every: int = 20
    # Newest checkpoints kept in OUT/checkpoints.
    keep_checkpoints: int = 3
    # fsspec storage options for s3:// (endpoint_url, profile, ...). Credentials come from the
    # standard AWS chain; never put secrets in a committed file.
    storage_options: dict = field(default_factory=dict)


@dataclass
class FeedbackConfig:
    """Closed loop: what the trainer accepts steers which classes and prompts are generated
    (docs/algorithm.md, Closed-loop generation). The defaults are open loop."""

    # open_loop: generation.class_weighting as is; yield_aware: classes whose candidates keep
    # being rejected get less (never below `floor` of their share); deficit: in proportion to
    # how far each class's accepted count is from its group's target.
    policy: Literal["open_loop", "yield_aware", "deficit"] = "open_loop"
    # uniform: each class's prompt options drawn uniformly; bandit: by their acceptance rates.
    template_policy: Literal["uniform", "bandit"] = "uniform"
    # Accepted instances wanted per class, by LVIS frequency group.
    targets: dict = field(default_factory=lambda: {"r": 100.0, "c": 60.0, "f": 30.0})
    # Stop generating a class once its target is met.
    stop_at_target: bool = False
    floor: float = 0.1
    # Decisions of a class after which older ones count half in its acceptance rate.
    half_life: float = 200.0
    temperature: float = 0.1
    exploration: float = 0.1
    # Seconds a generation actor waits for the demand actor before it draws open loop.
    timeout_s: float = 2.0
    # How many candidates generation may run ahead of the trainer's decisions (bounds the
    # loop's lag; Ray Data would otherwise read far ahead); 0: twice what the stages' and the
    # trainer's batches hold. A generation actor waits at most max_wait_s for it (during the
    # trainer's real-only warm-up nothing is decided: the stream waits at the bound).
    max_ahead: int = 0
    max_wait_s: float = 600.0


@dataclass
class RayConfig:
    """How the job reaches Ray: a local instance or an existing cluster."""

    # None: start a local Ray; "auto" or "ray://host:10001": connect to a cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = None
    # Fraction of the cluster's CPUs that Ray Data may use, leaving the rest to the trainer.
    data_cpu_fraction: float = 0.75
    # Keep the candidate stream in prompt order (needed for exact resume with 1 worker).
    preserve_order: bool = True
    # A stage actor that dies is restarted and its batch retried (-1: without limit).
    max_restarts: int = -1
    max_task_retries: int = -1
    # Ray Data's own per-operator progress bars (printed by the split coordinator's process);
    # bsgal prints one bar per stage and one for the trainer either way.
    data_progress_bars: bool = False
    # Forward the logs of Ray workers to this terminal (noisy; errors are reported anyway).
    log_to_driver: bool = False


@dataclass
class RunConfig:
    """A whole bsgal run. ``name`` and ``seed`` make candidate ids deterministic."""

    name: str = "bsgal"
    seed: int = 0
    schema_version: int = SCHEMA_VERSION
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# --------------------------------------------------------------------------------------------


def _suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'prefix.closest'?"`` or ``""`` when nothing is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = _suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}{hint}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:  # pragma: no cover - only the annotations above are used in this module
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) is not {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key '{full}'{_suggest(str(key), fields, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """Build a :class:`RunConfig` from nested plain data, checking every key and type."""
    cfg = _build(RunConfig, data or {}, "")
    if cfg.schema_version != SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version: {cfg.schema_version} is not supported by this bsgal "
            f"(expects {SCHEMA_VERSION}); re-create the config from configs/demo.yaml"
        )
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Return a copy of nested ``data`` with each ``a.b=value`` override set."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (local path or any fsspec URI); errors name the file."""
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text (UTF-8) YAML file: byte "
                          f"{exc.start} is {raw[exc.start]:#04x}; give a YAML file such as "
                          "configs/demo.yaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; give at least one section (see "
                          "configs/demo.yaml), or leave out --config for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load ``path`` (or the defaults when None), apply overrides, and validate."""
    data = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def config_to_dict(cfg: Any) -> dict:
    """Nested plain-data form of a config (the inverse of :func:`config_from_dict`)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a resolved config, sections in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""

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
    positive(cfg.selection.real_batch_size, "selection.real_batch_size")
    positive(cfg.output.shard_max_rows, "output.shard_max_rows")
    positive(cfg.output.log_every, "output.log_every")
    positive(cfg.annotation.check_batch_size, "annotation.check_batch_size")
    positive(cfg.annotation.check_concurrency, "annotation.check_concurrency")
    positive(cfg.training.num_cpus_per_worker, "training.num_cpus_per_worker")
    for key in ("warmup_real_steps", "candidate_batch_size", "prefetch_batches",
                "checkpoint_every", "eval_every"):
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
    for section in ("generation", "annotation"):
        if not isinstance(getattr(cfg, section).options, dict):
            raise ConfigError(f"{section}.options: must be a mapping of key to value")
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
    from selector.methods import selection_method

    try:
        selection_method(sel.granularity, sel.method)
    except ValueError as exc:
        raise ConfigError(f"selection.method: {exc}") from None
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

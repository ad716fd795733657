"""The sections of a run config: one dataclass each, with the defaults and what every key means.

The fields carry the defaults of the reference set-up where one exists (docs/algorithm.md,
Reference training set-up), so that a YAML file only names what differs. Loading is
:mod:`pipeline.config.loading`, the cross-key checks :mod:`pipeline.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

#: The version of the config layout (``schema_version``).
SCHEMA_VERSION = 1

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
    # pretrained: load `model`. random / random_tiny: Stable Diffusion 1.5's architecture (or
    # the tiny test one) with random weights, no file read: for throughput and memory runs
    # only (the images are noise; summary, shards and report say so).
    weights: Literal["pretrained", "random", "random_tiny"] = "pretrained"
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
    # A pool class the training set does not have (or names otherwise): error (the run is
    # refused at the start with the list) or rows (drawn anyway, each draw an
    # invalid_unknown_class decision row naming the cause).
    pool_unknown_classes: Literal["error", "rows"] = "error"
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
    # pretrained: load sam_checkpoint. random / random_tiny: sam_model_type's architecture
    # (or the tiny test SAM) with random weights, no file read: throughput and memory only.
    weights: Literal["pretrained", "random", "random_tiny"] = "pretrained"
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
    # auto: the paper's fixed threshold at batch granularity, the per-class percentile
    # (dynamic) at instance granularity (the selection benchmarks' best: README, Results).
    # fixed: score >= fixed_threshold; dynamic: the percentile keeping keep_fraction (batch: of the last
    # `window` batch scores; instance: of each class's candidates of the last
    # threshold_window_steps steps); schedule (batch only): keep_fraction ramped from
    # keep_fraction_start to _end; calibrated (instance only): reject a candidate whose score
    # is below the alpha-quantile of real instances of its class.
    threshold: Literal["auto", "fixed", "dynamic", "schedule", "calibrated"] = "auto"
    fixed_threshold: float = -0.05
    keep_fraction: float = 0.5
    keep_fraction_start: float = 0.5
    keep_fraction_end: float = 0.5
    window: int = 1000
    # calibrated: the target fraction of good candidates rejected.
    alpha: float = 0.1
    # Instance granularity: the percentile's scores and the calibrated reference are those of
    # the last N steps (the scores drift as the detector learns; a window of steps holds scores
    # taken at nearly the current weights for every class).
    threshold_window_steps: int = 100
    # calibrated: real scores a class needs for a reference of its own (it keeps at least its
    # last N however old); a class with fewer is judged against the pool of every class's.
    calibration_min_reference: int = 10
    # calibrated: real instances of the step's candidate classes, cut out of real training
    # images, pasted beside the candidates and scored as they are (never trained on).
    calibration_pastes: int = 4
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
    # all trainable parameters ("all"); class caches' update rule; the percentile threshold per
    # class or pooled.
    score_parameters: Literal["heads", "all"] = "heads"
    class_cache_update: Literal["momentum", "average"] = "average"
    per_class_threshold: bool = True
    # Instance granularity: where the class caches' real gradients come from. training_batch:
    # the real boxes of the step's own images (every class present), and for a candidate class
    # whose cache is empty or older than cache_max_age steps (and which those images lack) a
    # top-up of at most topup_images real images holding it; test_batch: the reference's extra
    # real "test" batch every step (max(real_batch_size, candidate classes) images).
    real_gradients: Literal["training_batch", "test_batch"] = "training_batch"
    topup_images: int = 2
    cache_max_age: int = 1000
    # Instance granularity: the class caches. input_basis: sketched on each head layer's input
    # side with a shared basis of sketch_rank directions per layer (output side exact; ~44 k
    # numbers per class on ResNet-50 FPN heads instead of 20 M), fitted on basis_images real
    # images and again every basis_refresh_steps steps (0: once); none: a full copy of the
    # scored parameters per class (the reference the sketch is checked against).
    cache_sketch: Literal["none", "input_basis"] = "input_basis"
    sketch_rank: int = 8
    basis_images: int = 8
    basis_refresh_steps: int = 100
    # The memory the class caches of every class of the data may take (MiB, per trainer
    # worker); `bsgal check` refuses a config whose caches would not fit.
    cache_memory_mb: float = 2048.0


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
    # pretrained: init_checkpoint where given. random: the arch's random initialisation even
    # where init_checkpoint is set (no file read): throughput and memory runs only.
    weights: Literal["pretrained", "random"] = "pretrained"
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
    # When the Ray Train workers are lost (a node went away, a worker process died), the run
    # restarts training from its latest checkpoint by itself this many times; 0: it ends and
    # says how to resume.
    max_failures: int = 3


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
    # How long stage actors or train workers may wait for a node that can hold them (a lost
    # node, a pinned resource no node offers) before the run checkpoints and exits with the
    # resume command; sized for an autoscaler to bring a node (seconds).
    placement_timeout_s: float = 600.0


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

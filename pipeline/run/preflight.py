"""Everything a run needs, checked before anything starts, and every problem listed at once.

``bsgal run`` and ``bsgal check`` call :func:`preflight`; it looks at, in order and without
stopping at the first problem:

* **output**: ``output.dir`` can be written, read back and deleted, and holds no other run;
* **Ray**: ``ray.address`` answers within seconds (a TCP connect to its host and port, since
  ``ray.init`` against an address that does not answer waits for minutes), and for a local Ray
  the stage pools and trainer workers fit this machine's CPUs/GPUs;
* **weights**: the Stable Diffusion folder or its copy in the Hugging Face cache, the SAM
  checkpoint (a tensor state dict: opened memory-mapped, so even ViT-H takes a second), the
  CLIP model where the quality checks use one, ``training.init_checkpoint``;
* **data**: the annotation JSONs (fields and types), the whole validation split decoded
  (a bad validation image would otherwise fail the run at its final evaluation, after all
  training) and an even sample of the training images.

Bad images follow ``data.bad_images``: ``error`` makes each one a problem, ``skip`` reports
them as warnings (they are left out of training and evaluation and named in the summary).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.demand import stages_annotate
from pipeline.storage.filesystem import fast_fail_options, is_uri

#: Training images decoded up front (evenly spaced over the split).
TRAIN_IMAGE_SAMPLE = 16
#: Seconds a TCP connect to ``ray.address`` may take.
RAY_CONNECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Problem:
    """One thing that stops the run: the config key (or area) and what to do."""

    key: str
    message: str

    def line(self) -> str:
        return f"{self.key}: {self.message}" if not self.message.startswith(self.key) \
            else self.message


@dataclass
class PreflightReport:
    """What :func:`preflight` found: problems stop the run, warnings do not, ``passed`` lists
    what was checked and is fine (``bsgal check`` prints it)."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def add(self, key: str, exc_or_message: BaseException | str) -> None:
        if isinstance(exc_or_message, BaseException):
            self.errors.append(exc_or_message)
            self.problems.append(Problem(key, str(exc_or_message)))
        else:
            self.problems.append(Problem(key, exc_or_message))

    def raise_if_problems(self) -> None:
        """One problem: its own error (so callers can tell kinds apart); several: one
        :class:`PreflightError` listing them all."""
        if not self.problems:
            return
        if len(self.problems) == 1 and len(self.errors) == 1:
            raise self.errors[0]
        raise PreflightError(self.problems)


class PreflightError(ConfigError):
    """Several problems found before the run started; the message lists every one."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p.line()}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problems found before starting (nothing was "
                         f"started; fix them and run again):\n{lines}")


# ---------------------------------------------------------------------------------- output


def check_output(cfg: RunConfig, report: PreflightReport, *, resume: bool) -> None:
    from pipeline.storage.filesystem import StorageError
    from pipeline.storage.run_dir import RunDir, check_fresh_output
    from pipeline.storage.shard_writer import preflight_writable

    out, opts = cfg.output.dir.rstrip("/"), cfg.output.storage_options
    try:
        preflight_writable(out, fast_fail_options(out, opts))
    except StorageError as exc:
        report.add("output.dir", exc)
        return
    if not resume:
        try:
            check_fresh_output(RunDir(out, opts))
        except ConfigError as exc:
            report.add("output.dir", exc)
            return
    report.passed.append(f"output {out} is writable")


# ------------------------------------------------------------------------------------- Ray


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) that ``ray.address`` connects to, or None when it names no socket
    (``auto``/``local``: found by Ray itself)."""
    value = address.strip()
    for prefix in ("ray://", "http://", "https://"):
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    value = value.split("/", 1)[0]
    if value in ("auto", "local", ""):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _auto_address() -> str | None:
    """The address ``ray.address=auto`` resolves to: ``$RAY_ADDRESS`` or the cluster this
    machine started last (Ray's own ``/tmp/ray/ray_current_cluster`` file)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        text = Path("/tmp/ray/ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return text or None


def probe_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> str | None:
    """None when ``address`` answers (or names no socket to try), else the problem."""
    if address.strip() == "auto":
        resolved = _auto_address()
        if resolved is None:
            return ("'auto' finds no running Ray cluster on this machine (no $RAY_ADDRESS, no "
                    "`ray start` here); start one with `ray start --head`, give its address, "
                    "or set ray.address=null for a local Ray started by the run")
        address = resolved
    target = ray_host_port(address)
    if target is None:
        return None
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return (f"nothing answers at {host}:{port} ({reason} within {timeout:g} s); start the "
                "cluster (`ray start --head`), check the address and port (the GCS port, "
                "6379 by default; ray:// client port 10001), or set ray.address=null for a "
                "local Ray")


def local_resources(cfg: RunConfig) -> tuple[float, float]:
    """CPUs and GPUs a local Ray started by the run would hold."""
    cpus = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except Exception:  # no CUDA build or a broken driver: the job sees no GPU either
        gpus = 0.0
    return cpus, gpus


def check_ray(cfg: RunConfig, report: PreflightReport,
              cluster: Callable[[RunConfig], Any] | None = None) -> None:
    """The address answers; the job fits this machine, or with ``cluster`` (connects and
    returns :class:`pipeline.cluster.nodes.ClusterFacts`) the cluster: CPUs and GPUs, every
    custom resource the config pins a stage to, each unit on one node, and a local
    ``output.dir`` that every train node shares."""
    from pipeline.demand import check_fits

    if cfg.ray.address:
        problem = probe_ray_address(cfg.ray.address)
        if problem is not None:
            report.add("ray.address", f"ray.address: {cfg.ray.address!r}: {problem}")
            return
        if cluster is None:
            report.passed.append(f"Ray answers at {cfg.ray.address}")
            return
        try:
            facts = cluster(cfg)
        except ConfigError as exc:
            report.add("ray.address", exc)
            return
        if facts.output_problem:
            report.add("output.dir", facts.output_problem)
        for note in facts.output_notes:
            (report.passed if "same folder" in note else report.warnings).append(note)
        if facts.fit_problem:
            report.add("cluster fit", facts.fit_problem)
        else:
            report.warnings.extend(facts.fit_warnings)
            report.passed.append(f"{facts.fit} at {cfg.ray.address}")
        return
    cpus, gpus = local_resources(cfg)
    try:
        check_fits(cfg, cpus, gpus)
        report.passed.append(f"the job fits this machine ({cpus:g} CPUs, {gpus:g} GPUs)")
    except ConfigError as exc:
        report.add("cluster fit", exc)
    pins = _pins(cfg)
    if pins:
        report.add("cluster fit", f"the config pins stages to {', '.join(pins)}, which a "
                   "local Ray does not offer; set ray.address to the cluster, or clear "
                   "generation.resources / annotation.resources / "
                   "training.resources_per_worker")


def _pins(cfg: RunConfig) -> list[str]:
    """The custom resources the config asks for."""
    from pipeline.demand import run_requests

    return sorted({k for r in run_requests(cfg) if r.count > 0 for k in r.unit}
                  - {"CPU", "GPU"})


# --------------------------------------------------------------------------------- weights


def check_weights(cfg: RunConfig, report: PreflightReport) -> None:
    """The weights the run will load: each stage backend checks its own
    (``check_weights`` beside its code), then CLIP and the initial checkpoint."""
    import dataclasses

    from annotators import ANNOTATORS
    from generators import GENERATORS
    from generators.hub import check_hub_model

    if cfg.generation.backend in GENERATORS:
        GENERATORS.check_weights(cfg.generation.backend, dataclasses.asdict(cfg.generation),
                                 report)
    if stages_annotate(cfg):
        ANNOTATORS.check_weights(cfg.annotation.backend, dataclasses.asdict(cfg.annotation),
                                 report)
    if cfg.annotation.clip_score:
        check_hub_model(
            report, "annotation.clip_model", cfg.annotation.clip_model, "config.json",
            lambda m: (f"CLIP model {m!r} is not available here: download it once "
                       f"(`hf download {m}`) into the cache this machine reads (HF_HOME), or "
                       "pass a folder holding a CLIP model; or set annotation.clip_score=false"))
    init = cfg.training.init_checkpoint if cfg.training.weights == "pretrained" else None
    if cfg.training.weights == "random":
        report.passed.append("training.weights: random (no initial checkpoint read; throughput "
                             "and memory only)")
    if init and not is_uri(init) and not Path(init).expanduser().is_file():
        report.add("training.init_checkpoint",
                   f"training.init_checkpoint: {init!r} does not exist")


def check_initial_weights(cfg: RunConfig, num_classes: int, report: PreflightReport) -> None:
    """``training.init_checkpoint`` against the configured detector, by names and shapes
    (`trainer.factory.initial_weights_fit`; nothing is built but on the meta device)."""
    init = cfg.training.init_checkpoint if cfg.training.weights == "pretrained" else None
    if not init or is_uri(init) or not Path(init).expanduser().is_file():
        return  # absent: check_weights says so; remote: read when the run starts
    from trainer.factory import initial_weights_fit

    t = cfg.training
    try:
        fit, total, other = initial_weights_fit(str(Path(init).expanduser()), num_classes,
                                                backend=t.backend, arch=t.arch,
                                                image_size=t.image_size)
    except Exception as exc:  # noqa: BLE001 - any reason it cannot be read is the finding
        report.add("training.init_checkpoint", f"training.init_checkpoint: {init} cannot be "
                   f"read as weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return
    if fit < total / 2:  # another class count costs the predictor only: a few entries
        report.add("training.init_checkpoint",
                   f"training.init_checkpoint: only {fit} of the {total} entries of "
                   f"training.arch={t.arch} ({t.backend}) fit {init} by name and shape (it "
                   f"holds e.g. {', '.join(other) or 'nothing that fits'}); is it a checkpoint "
                   "of another architecture? set training.arch to the one it was trained with")
        return
    report.passed.append(f"training.init_checkpoint: {fit} of the detector's {total} entries "
                         f"load from {init}")


# ------------------------------------------------------------------------------------ pool

#: Pool entries opened by the check, spread evenly over the index.
POOL_ENTRY_SAMPLE = 16


def check_pool(cfg: RunConfig, report: PreflightReport) -> None:
    """``generation.backend: pool``: the index as the run will read it (format, layout, its
    classes against the training set's where the data is there) and a sample of its entries
    opened; more than half of them unusable is a problem (the run would make mostly invalid
    rows), fewer are said."""
    from pipeline.config.sections import POOL_BACKEND

    g = cfg.generation
    if g.backend != POOL_BACKEND:
        return
    from pipeline.run.datasets import train_categories
    from pipeline.run.pool_entries import EntryError, EntryReader
    from pipeline.run.pool_source import pool_draws
    from pipeline.storage.pool_index import PoolFormatError, read_pool

    try:
        try:
            categories = train_categories(cfg.data)
        except (FileNotFoundError, OSError):
            categories = None  # the built-in set, written when the run starts
        if categories is None and g.pool_format == "images":
            report.passed.append(f"pool {g.pool}: its class folders are checked against the "
                                 "built-in set once it is written (when the run starts)")
            return
        if categories is None:
            index = read_pool(g.pool, g.pool_format, decisions=tuple(g.pool_decisions),
                              storage_options=g.pool_storage_options,
                              path_map=dict(g.pool_path_map))
        else:
            index = pool_draws(cfg, categories).index
    except (PoolFormatError, ConfigError) as exc:
        report.add("generation.pool", exc)
        return
    except Exception as exc:  # noqa: BLE001 - any reason it cannot be read is the finding
        report.add("generation.pool", f"generation.pool: {g.pool} cannot be read "
                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return
    n = len(index)
    sample = sorted({round(i * (n - 1) / max(1, POOL_ENTRY_SAMPLE - 1))
                     for i in range(min(n, POOL_ENTRY_SAMPLE))})
    reader = EntryReader(g.pool_storage_options)
    bad = []
    for entry in sample:
        try:
            if index.needs_masks:
                reader.plain_image(index.refs[entry])
            else:
                reader.read(index.refs[entry])
        except EntryError as exc:
            bad.append(str(exc))
    what = (f"pool {g.pool}: {index.format}, {n} entries of {len(index.class_ids)} classes; "
            f"{len(sample) - len(bad)} of {len(sample)} sampled entries open")
    if len(bad) * 2 > len(sample):
        report.add("generation.pool", f"generation.pool: {len(bad)} of {len(sample)} sampled "
                   f"entries of {g.pool} cannot be used (e.g. {bad[0]})")
    else:
        report.passed.append(what + (f" ({bad[0]})" if bad else ""))


# ------------------------------------------------------------------------------------ data


def bad_images_of(dataset: Any, indices: list[int], threads: int = 8) -> list[str]:
    """The images of ``dataset`` at ``indices`` that do not load, as ``uri: why`` lines."""
    from trainer.datasets.lvis_format import DatasetFormatError

    def load(i: int) -> str | None:
        try:
            dataset.load_image(i)
        except DatasetFormatError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [line for line in pool.map(load, indices) if line is not None]


def check_data(cfg: RunConfig, report: PreflightReport) -> None:
    from pipeline.run.datasets import open_splits
    from trainer.datasets.lvis_format import DatasetFormatError

    data = cfg.data
    if data.dataset == "builtin" and not is_uri(data.root) and not all(
            (Path(data.root) / n).is_file() for n in (data.train_json, data.val_json)):
        report.passed.append(f"data: the built-in set will be written to {data.root}")
        check_cache_memory(cfg, data.synth_num_classes, report)
        check_initial_weights(cfg, data.synth_num_classes, report)
        return
    try:
        train, val = open_splits(data)
    except (DatasetFormatError, FileNotFoundError, OSError) as exc:
        report.add("data.root", exc if isinstance(exc, DatasetFormatError) else
                   f"data.root: {type(exc).__name__}: {exc}")
        return
    check_cache_memory(cfg, train.num_classes, report)
    check_initial_weights(cfg, train.num_classes, report)
    n = len(train)
    sample = sorted({round(i * (n - 1) / max(1, TRAIN_IMAGE_SAMPLE - 1))
                     for i in range(min(n, TRAIN_IMAGE_SAMPLE))}) if n else []
    for split, dataset, indices in (("validation", val, list(range(len(val)))),
                                    ("training", train, sample)):
        bad = bad_images_of(dataset, indices)
        what = (f"all {len(indices)} validation images" if split == "validation"
                else f"{len(indices)} training images sampled evenly from {n}")
        if not bad:
            report.passed.append(f"data: {what} decode")
            continue
        listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        found = f"data: {len(bad)} of {what} do not load"
        if data.bad_images == "error":
            report.add("data.bad_images",
                       f"{found}: {listed}. Replace them, or set data.bad_images=skip to leave "
                       "such images out (named in the summary)")
        else:
            report.warnings.append(f"{found} and will be skipped (data.bad_images=skip): "
                                   f"{listed}")


def check_cache_memory(cfg: RunConfig, num_classes: int, report: PreflightReport) -> None:
    """The class caches of every class of the data against ``selection.cache_memory_mb``."""
    import dataclasses

    from trainer.cache_memory import MIB, cache_memory

    try:
        memory = cache_memory(cfg.training.arch, num_classes, dataclasses.asdict(cfg.selection))
    except ValueError as exc:
        report.warnings.append(f"selection: {exc}")
        return
    if memory is None:
        return
    budget = cfg.selection.cache_memory_mb
    if memory.total > budget * MIB:
        fix = ("set selection.cache_sketch=input_basis (about 0.2 MiB per class on ResNet-50 "
               "FPN heads)" if memory.kind == "exact" else "lower selection.sketch_rank")
        report.add("selection.cache_memory_mb",
                   f"selection: the {memory.describe()} exceed selection.cache_memory_mb="
                   f"{budget:g}; {fix}, or raise selection.cache_memory_mb if the trainer has "
                   "the memory")
    else:
        report.passed.append(f"selection: {memory.describe()} (within "
                             f"selection.cache_memory_mb={budget:g})")


# ----------------------------------------------------------------------------------- whole


def preflight(cfg: RunConfig, *, resume: bool = False,
              cluster: Callable[[RunConfig], Any] | None = None
              ) -> PreflightReport:
    """Check output, Ray, weights and data of ``cfg`` (module docstring); never raises for
    what it finds: the report holds it. ``cluster``: see :func:`check_ray` (``bsgal run``
    checks the fit on a cluster once it is connected to it anyway)."""
    report = PreflightReport()
    check_output(cfg, report, resume=resume)
    check_ray(cfg, report, cluster)
    check_weights(cfg, report)
    check_data(cfg, report)
    check_pool(cfg, report)
    return report

"""The ``bsgal`` command line.

Heavy libraries (torch, ray, diffusers) are imported inside the commands that need them, so
``bsgal --help`` and ``bsgal config show`` answer at once.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from pipeline.command_line import CONTEXT, storage_flags, storage_options_from, user_errors
from pipeline.config import dump_config, load_config

@click.group(context_settings=CONTEXT)
@click.version_option(package_name="bsgal")
def main() -> None:
    """bsgal: generative active learning for long-tailed instance segmentation.

    Stable Diffusion draws objects of rare classes, SAM cuts them out, and the detector being
    trained accepts or rejects each batch by its estimated effect on the loss on real data
    (BSGAL, Zhu et al., ICML 2024). Every decision is written to Parquet shards.

    \b
    Start with:
      bsgal demo                     the whole job on the built-in data, CPU, minutes
      bsgal run --config F k=v ...   a real run (local Ray or a cluster)
      bsgal config show              the resolved configuration and every key
    """


# ------------------------------------------------------------------------------------ config


@main.group(context_settings=CONTEXT)
def config() -> None:
    """Show and check run configurations (YAML + section.key=value overrides)."""


@config.command("show", context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file (default: built-in defaults).")
@click.argument("overrides", nargs=-1)
@user_errors
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config: the file's values, then OVERRIDES (section.key=value).

    \b
    Example:
      bsgal config show --config configs/demo.yaml selection.threshold=dynamic training.steps=400
    """
    cfg = load_config(config_path, overrides)
    click.echo(dump_config(cfg), nl=False)
    memory = selection_memory_line(cfg)
    if memory:
        click.echo(f"# {memory}")


def selection_memory_line(cfg) -> str:
    """What the class caches of ``cfg`` take (a comment under ``bsgal config show``)."""
    import dataclasses

    from trainer.cache_memory import cache_memory

    classes = (cfg.data.synth_num_classes if cfg.data.dataset == "builtin" else 1203)
    where = "the built-in set's" if cfg.data.dataset == "builtin" else "LVIS's"
    try:
        memory = cache_memory(cfg.training.arch, classes, dataclasses.asdict(cfg.selection))
    except ValueError:
        return ""
    return "" if memory is None else f"selection memory ({where} classes): {memory.describe()}"


# -------------------------------------------------------------------------------------- data


@main.group(context_settings=CONTEXT)
def data() -> None:
    """Make and check datasets."""


@data.command("synth", context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Random seed; same seed, same files.")
@click.option("--classes", "num_classes", default=12, show_default=True,
              help="Number of classes (planned as frequent / common / rare in turn), at least 3.")
@click.option("--train-images", default=600, show_default=True,
              help="Training images: at least 6 per rare and 40 per common class plus 1 per "
                   "frequent class (188 for 12 classes).")
@click.option("--val-images", default=150, show_default=True)
@click.option("--image-size", default=128, show_default=True, help="Square image side in px.")
@click.option("--force", is_flag=True,
              help="Write into a non-empty OUT: first delete the set written there before "
                   "(train.json, val.json and images/{train,val}/NNNNNN.png, nothing else; "
                   "other files are kept).")
@user_errors
def data_synth(out: str, seed: int, num_classes: int, train_images: int, val_images: int,
               image_size: int, force: bool) -> None:
    """Write the built-in long-tailed set to OUT as an LVIS-format folder.

    OUT gets train.json, val.json and images/{train,val}/*.png; the official lvis package and
    `bsgal evaluate` read it as they read LVIS v1. Each class's frequency is LVIS's group of
    the number of training images holding it (rare 1-10, common 11-100, frequent > 100). OUT
    must be empty or new, unless --force.
    """
    from pathlib import Path

    from trainer.datasets.builtin import (
        DatasetSizeError,
        check_builtin_sizes,
        remove_builtin_dataset,
        write_builtin_dataset,
    )

    options = {"num_classes": "--classes", "num_train_images": "--train-images",
               "num_val_images": "--val-images", "image_size": "--image-size"}
    try:
        check_builtin_sizes(num_classes, train_images, val_images, image_size)
    except DatasetSizeError as exc:
        raise click.BadParameter(f"{exc.value} {exc.why}", param_hint=options[exc.name]) from None
    root = Path(out)
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if present and not force:
        listing = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise click.ClickException(
            f"{out} is not empty ({listing}); choose a new or empty folder, or pass --force to "
            "replace the built-in set there (deletes only train.json, val.json and "
            "images/{train,val}/NNNNNN.png)")
    if present:
        removed = remove_builtin_dataset(root)
        if removed:
            click.echo(f"removed {removed} files of the set written to {out} before")
    try:
        path = write_builtin_dataset(out, seed=seed, num_classes=num_classes,
                                     num_train_images=train_images, num_val_images=val_images,
                                     image_size=image_size)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = _dataset_summary(str(path))
    click.echo(f"wrote {path}")
    click.echo(summary)


def _dataset_summary(root: str) -> str:
    from trainer.datasets.lvis_format import load_lvis_json

    train = load_lvis_json(f"{root}/train.json")
    val = load_lvis_json(f"{root}/val.json")
    groups = {"f": 0, "c": 0, "r": 0}
    for cat in train["categories"]:
        groups[cat["frequency"]] += 1
    return (
        f"train: {len(train['images'])} images, {len(train['annotations'])} instances; "
        f"val: {len(val['images'])} images, {len(val['annotations'])} instances; "
        f"classes: {groups['f']} frequent, {groups['c']} common, {groups['r']} rare"
    )


# ---------------------------------------------------------------------------------- evaluate


@main.command(context_settings=CONTEXT)
@click.argument("gt")
@click.argument("dets")
@click.option("--iou-type", "iou_types", multiple=True, type=click.Choice(["bbox", "segm"]),
              help="Evaluate on this; repeat for both. Default: what DETS hold, bbox and, when "
                   "every detection has a 'segmentation', segm (a note on stderr says what "
                   "was skipped and why).")
@click.option("--max-dets", default=300, show_default=True, help="Detections kept per image.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@user_errors
def evaluate(gt: str, dets: str, iou_types: tuple[str, ...], max_dets: int,
             as_json: bool) -> None:
    """LVIS AP, AP50, AP75, APr, APc, APf of DETS (results JSON) against GT (LVIS JSON).

    DETS holds a JSON list of detections (LVIS results format: image_id, category_id, bbox,
    score, and segmentation as RLE for segm). Both may be local paths or s3:// URIs. Uses the
    official lvis evaluator.
    """
    from trainer.evaluation import METRICS, evaluate_lvis

    def skipped(iou_type: str, why: str) -> None:
        click.echo(f"note: {iou_type} not evaluated: {why}", err=True)

    try:
        results = evaluate_lvis(gt, dets, iou_types=iou_types or None, max_dets=max_dets,
                                on_skip=skipped)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{'':6}" + "".join(f"{m:>8}" for m in METRICS))
    for iou_type, metrics in results.items():
        click.echo(f"{iou_type:6}" + "".join(f"{100 * metrics[m]:8.1f}" for m in METRICS))


# ------------------------------------------------------------------------------- run, demo

PROGRESS = click.option(
    "--progress", type=click.Choice(["auto", "bars", "lines", "off"]), default="auto",
    show_default=True,
    help="Progress of each stage and the trainer: bars on a terminal, a line every 15 s "
         "otherwise (auto), or off.")


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file (see configs/).")
@click.option("--resume", "resume_out", metavar="OUT", default=None,
              help="Continue the run in OUT (local folder or s3://) from its last checkpoint; "
                   "OVERRIDES may then only change ray.*, storage options and logging keys.")
@functools.partial(storage_flags, what="output.dir",
                   endpoint_note=" Needed with --resume to read a run's config from such "
                                 "a store.")
@PROGRESS
@click.argument("overrides", nargs=-1)
@user_errors
def run(config_path: str | None, resume_out: str | None, endpoint_url: str | None,
        storage_pairs: tuple[str, ...], progress: str, overrides: tuple[str, ...]) -> None:
    """Run the streaming job: generate → annotate → check (Ray Data) → train and judge (Ray
    Train) → decision shards in output.dir.

    \b
    Examples:
      bsgal run --config configs/demo.yaml training.steps=400 output.dir=runs/short
      bsgal run --config configs/lvis_sd_sam.yaml ray.address=auto
      bsgal run --resume runs/short
    """
    import dataclasses

    from pipeline.run.job import resume_job, run_job
    from pipeline.inspection.run_summary import summary_text

    storage = storage_options_from(endpoint_url, storage_pairs)
    if resume_out is not None:
        if config_path is not None:
            raise click.UsageError("--resume continues a run with its own config.yaml; "
                                   "leave out --config")
        result = resume_job(resume_out, overrides, progress=progress, storage_options=storage,
                            echo=click.echo)
    else:
        if config_path is None:
            raise click.UsageError("give --config FILE (e.g. configs/demo.yaml) or --resume OUT")
        cfg = load_config(config_path, overrides)
        if storage:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(
                cfg.output, storage_options={**cfg.output.storage_options, **storage}))
        result = run_job(cfg, progress=progress, echo=click.echo)
    click.echo(summary_text(result.summary))


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file (see configs/).")
@click.option("--resume", "resume_out", metavar="OUT", default=None,
              help="Check the resume of the run in OUT instead (its own config.yaml).")
@functools.partial(storage_flags, what="output.dir")
@click.option("--connect/--no-connect", default=True, show_default=True,
              help="With ray.address set: connect to the cluster and check that the job fits "
                   "it (otherwise only that the address answers).")
@click.argument("overrides", nargs=-1)
@user_errors
def check(config_path: str | None, resume_out: str | None, endpoint_url: str | None,
          storage_pairs: tuple[str, ...], connect: bool, overrides: tuple[str, ...]) -> None:
    """Check everything a run needs, before anything starts, and list every problem at once.

    \b
    Checks: the config; output.dir (written, read back, deleted; holds no other run); Ray
    (ray.address answers within seconds; the job fits the cluster or this machine); model
    weights (the Stable Diffusion folder or Hugging Face cache, the SAM checkpoint, CLIP where
    used, training.init_checkpoint); the data (annotation JSONs, every validation image and
    a sample of training images decoded). `bsgal run` runs the same checks first. Exits 1 when
    anything is wrong.

    \b
    Examples:
      bsgal check --config configs/lvis_sd_sam.yaml data.root=/datasets/lvis
      bsgal check --config configs/demo.yaml ray.address=10.0.0.5:6379
    """
    import dataclasses

    from pipeline.paths import absolute_paths
    from pipeline.run.job import cluster_capacity
    from pipeline.run.preflight import preflight
    from pipeline.storage.run_config import resume_config

    from pathlib import Path

    storage = storage_options_from(endpoint_url, storage_pairs)
    if resume_out is not None:
        cfg = resume_config(resume_out, overrides, storage)
    else:
        if config_path is None:
            raise click.UsageError("give --config FILE (e.g. configs/demo.yaml) or --resume OUT")
        cfg = load_config(config_path, overrides)
        if storage:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(
                cfg.output, storage_options={**cfg.output.storage_options, **storage}))
    cfg = absolute_paths(cfg, Path.cwd())
    report = preflight(cfg, resume=resume_out is not None,
                       cluster=cluster_capacity if connect else None)
    for line in report.passed:
        click.echo(f"ok       {line}")
    for line in report.warnings:
        click.echo(f"warning  {line}")
    for problem in report.problems:
        click.echo(f"PROBLEM  {problem.line()}", err=True)
    if report.problems:
        raise SystemExit(1)
    click.echo("all checks passed")


@main.command(context_settings=CONTEXT)
@click.option("--out", default=None, help="Run folder (default: output.dir of the demo "
              "config, runs/demo).")
@click.option("--fresh", is_flag=True, help="Delete OUT first if it holds an earlier run.")
@PROGRESS
@click.argument("overrides", nargs=-1)
@user_errors
def demo(out: str | None, fresh: bool, progress: str, overrides: tuple[str, ...]) -> None:
    """The whole job on the embedded default, on the CPU, in minutes (configs/demo.yaml).

    Built-in long-tailed data (written to data/builtin on first use), the procedural generator
    and the classical annotator on Ray Data, a small Mask R-CNN trained and judging the
    candidates with BSGAL on Ray Train; decisions in OUT/shards. Prints a summary at the end.

    \b
    Examples:
      bsgal demo
      bsgal demo --out runs/demo2 training.steps=400
    """
    from pipeline.run.demo import demo_config, remove_run
    from pipeline.run.job import run_job
    from pipeline.inspection.run_summary import summary_text

    cfg = demo_config(overrides, out)
    if fresh:
        remove_run(cfg.output.dir, cfg.output.storage_options)
    result = run_job(cfg, progress=progress, echo=click.echo)
    click.echo(summary_text(result.summary))


# ------------------------------------------------------------------------------- rescore


@main.command(context_settings=CONTEXT)
@click.argument("source")
@click.option("--checkpoint", "checkpoint", required=True, metavar="CKPT",
              help="The detector state that judges: RUN/checkpoints/step-N.pt, or a run folder "
                   "(its latest checkpoint). Its run's config.yaml gives the selection.")
@click.option("--out", "out", required=True, help="Folder for the decision shards (new).")
@click.option("--decision", "decisions", multiple=True,
              type=click.Choice(["accepted", "rejected", "invalid"]),
              help="SOURCE a run: judge these partitions again; repeat for several "
                   "(default: accepted and rejected).")
@click.option("--cache", type=click.Choice(["real", "checkpoint"]), default="real",
              show_default=True,
              help="Real-gradient cache: per class from real images at the checkpoint's "
                   "weights (real), or the caches saved in the checkpoint, held fixed.")
@click.option("--real-images", default=8, show_default=True, type=click.IntRange(min=1),
              help="--cache real: real images per class.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Scoring actors (default: one per GPU of the cluster, else one).")
@functools.partial(storage_flags, what="the source, the checkpoint's run and --out")
@click.argument("overrides", nargs=-1)
@user_errors
def rescore(source: str, checkpoint: str, out: str, decisions: tuple[str, ...], cache: str,
            real_images: int, workers: int | None, endpoint_url: str | None,
            storage_pairs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Judge stored candidates again with one detector state, without training, on Ray.

    SOURCE is a run folder (or its shards), a `bsgal export-pool` folder or an X-Paste pool
    JSON. Every candidate is scored at CKPT's weights with its run's selection settings
    (batched, on a GPU where the cluster has one) and gets one row in OUT/shards, whose
    judged_by names CKPT; OUT/rescore.json records the run. OVERRIDES may change only keys
    that cannot change a decision (ray.*, storage options) and those that describe SOURCE
    (generation.pool_*, e.g. pool_format or pool_path_map, and selection.quality_gates).

    \b
    Examples:
      bsgal rescore runs/demo --checkpoint runs/demo/checkpoints/step-000000200.pt \\
          --out runs/demo-at-200
      bsgal inspect runs/demo-at-200 --compare runs/demo
    """
    from pipeline.cluster.connect import connect
    from pipeline.run.rescore import RescoreRequest
    from pipeline.run.rescore import rescore as run_rescore

    request = RescoreRequest(source=source, checkpoint=checkpoint, out=out,
                             overrides=tuple(overrides),
                             decisions=tuple(decisions) or ("accepted", "rejected"),
                             cache=cache, real_images=real_images, workers=workers,
                             storage_options=storage_options_from(endpoint_url, storage_pairs))
    info = run_rescore(request, connect=connect, echo=click.echo)
    counts = info["counts"]
    click.echo(f"rescored {info['candidates']} candidates with {info['judged_by']} in "
               f"{info['seconds']:.0f} s: accepted {counts['accepted']}, rejected "
               f"{counts['rejected']}, invalid {counts['invalid']}")
    click.echo(f"decision shards: {out.rstrip('/')}/shards")
    compare_with = info.get("compare_with")
    click.echo(f"next: bsgal inspect {out}" + (f" --compare {compare_with}" if compare_with
                                               else ""))


# ------------------------------------------------------------------------------------ plan


@main.command(context_settings=CONTEXT)
@click.argument("source")
@click.option("--train-gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="Training GPUs (Ray Train workers) to keep busy.")
@click.option("--accept-rate", default=None, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Share of candidates accepted, for the cost per accepted instance "
                   "(default: the run's; 0.7 for a gpu_check file, which measures none).")
@click.option("--write-overrides", "write_to", default=None, type=click.Path(dir_okay=False),
              help="Also write the run overrides and the deploy/cluster.yaml counts to this "
                   "YAML file.")
@functools.partial(storage_flags, what="SOURCE")
@user_errors
def plan(source: str, train_gpus: int, accept_rate: float | None, write_to: str | None,
         endpoint_url: str | None, storage_pairs: tuple[str, ...]) -> None:
    """How many generation and annotation GPUs keep N training GPUs busy, from measured costs.

    SOURCE is a run folder (the device-seconds per candidate and stage that its shards record)
    or a benchmarks/gpu_check.py results file (gpu_check.json). Prints the candidates/s the
    trainers decide, the devices each stage needs, the cost per accepted instance, the run's
    overrides and the node counts for deploy/cluster.yaml (and the KubeRay groups).

    \b
    Examples:
      bsgal plan runs/demo --train-gpus 4
      bsgal plan benchmarks/results/gpu_check.json --train-gpus 8 --write-overrides plan.yaml
    """
    import yaml

    from pipeline.inspection.capacity_plan import (
        cluster_overrides,
        load_costs,
        make_plan,
        plan_text,
        run_overrides,
    )

    costs = load_costs(source, storage_options_from(endpoint_url, storage_pairs) or None,
                       accept_rate)
    result = make_plan(costs, train_gpus)
    click.echo(plan_text(result))
    if write_to:
        from pipeline.storage.filesystem import check_output_path

        check_output_path(write_to, None, kind="file", option="--write-overrides")
        with open(write_to, "w") as fh:
            yaml.safe_dump({"run_overrides": run_overrides(result),
                            "cluster": cluster_overrides(result)}, fh, sort_keys=False)
        click.echo(f"overrides written to {write_to}")


# ------------------------------------------------------------------ inspect, export-pool

from pipeline.inspection.commands import export_pool_command, inspect_command  # noqa: E402

main.add_command(inspect_command)
main.add_command(export_pool_command)

# ------------------------------------------------------------------ submit, job (Ray Jobs)

from pipeline.cluster.commands import job, submit  # noqa: E402

main.add_command(submit)
main.add_command(job)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

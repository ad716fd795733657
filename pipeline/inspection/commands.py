"""``bsgal inspect`` and ``bsgal export-pool``: read a run's decisions without writing code.

Only click is imported at module level (``bsgal --help`` stays fast); DuckDB, pyarrow and
Pillow are imported inside the commands.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import click

from pipeline.command_line import (
    CONTEXT,
    storage_flags,
    storage_options_from,
    user_errors,
)
from pipeline.inspection import DECISION_CHOICES, TABLE_NAMES

WHERE_HELP = ("One boolean SQL expression over the shard columns, run by DuckDB, e.g. "
              "\"score > 0.1 AND step < 500\"; it only narrows the other filters (AND). No "
              "subqueries, table functions (read_csv, ...), UNION, comments or ';'.")


def _filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--class", "classes", multiple=True, metavar="NAME|ID",
                     help="Only this class (name or id); repeat for several."),
        click.option("--decision", "decisions", multiple=True,
                     type=click.Choice(DECISION_CHOICES),
                     help="Only this decision; repeat for several."),
        click.option("--reason", "reasons", multiple=True, metavar="REASON",
                     help="Only this reason (rejected_score, invalid_empty_mask, or a pattern "
                          "such as 'invalid_*'); repeat for several."),
        click.option("--where", "where", metavar="SQL", help=WHERE_HELP),
        click.option("--skip-unreadable", is_flag=True,
                     help="Leave out shard files that cannot be read (truncated, not Parquet) "
                          "and say how many, instead of stopping at the first."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open_query(uri: str, classes: tuple[str, ...], decisions: tuple[str, ...],
                reasons: tuple[str, ...], where: str | None, storage: dict[str, Any] | None,
                skip_unreadable: bool = False):
    from pipeline.inspection.query import DecisionFilter, DecisionQuery

    filters = DecisionFilter(classes=classes, decisions=decisions, reasons=reasons,
                             where=where or None)
    q = DecisionQuery(uri, filters, storage_options=storage, skip_unreadable=skip_unreadable)
    if q.skipped:
        click.echo(f"warning: {len(q.skipped)} unreadable shard file(s) left out, e.g. "
                   f"{q.skipped[0]}", err=True)
    return q


def _human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


# ----------------------------------------------------------------------------------- inspect


@click.command("inspect", context_settings=CONTEXT)
@click.argument("uri")
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
@click.option("--csv", "as_csv", is_flag=True,
              help="Print one table as CSV (choose it with --table; --rows implies rows).")
@click.option("--table", "tables", multiple=True, type=click.Choice(TABLE_NAMES),
              help="Only this table; repeat for several (default: all but rows).")
@click.option("--rows", "show_rows", is_flag=True,
              help="Also list the matching decisions themselves (see --limit).")
@click.option("--limit", default=20, type=click.IntRange(min=0), show_default=True,
              help="Decisions listed by --rows; 0 for all.")
@click.option("--top", default=5, type=click.IntRange(min=0), show_default=True,
              help="Text output: the N most and N least accepted classes (0: all).")
@click.option("--step-bins", default=10, type=click.IntRange(min=1), show_default=True,
              help="Ranges of training steps in the acceptance-over-steps table.")
@click.option("--html", "html_path", metavar="FILE",
              help="Write a self-contained HTML review report to FILE instead of printing "
                   "tables.")
@click.option("--thumbs-per-class", default=24, type=click.IntRange(min=1), show_default=True,
              help="HTML: thumbnails per class and decision, at most (random sample).")
@click.option("--thumb-size", default=96, type=click.IntRange(min=8, max=1024), show_default=True,
              help="HTML: longest side of a thumbnail in pixels.")
@click.option("--max-classes", default=60, type=click.IntRange(min=1), show_default=True,
              help="HTML: classes with a gallery, at most (those with most candidates).")
@click.option("--seed", default=0, show_default=True, help="HTML: seed of the thumbnail "
              "sample.")
@click.option("--compare", "other", metavar="OTHER",
              help="Compare with another judgement of the same candidates (e.g. the run and "
                   "its `bsgal rescore`, or two rescorings), joined on sample_id: who judged, "
                   "decision transitions, and per class which rejections became acceptances "
                   "and the reverse. The filters apply to URI's side.")
@storage_flags
@user_errors
def inspect_command(uri: str, classes: tuple[str, ...], decisions: tuple[str, ...],
                    reasons: tuple[str, ...], where: str | None, skip_unreadable: bool,
                    as_json: bool, as_csv: bool,
                    tables: tuple[str, ...], show_rows: bool, limit: int, top: int,
                    step_bins: int, html_path: str | None, thumbs_per_class: int,
                    thumb_size: int, max_classes: int, seed: int, other: str | None,
                    endpoint_url: str | None, storage_pairs: tuple[str, ...]) -> None:
    """What was accepted and rejected in a run, and why.

    URI is a run folder or its shards folder, local or s3://. Prints counts by decision and
    reason, acceptance by frequency group and by class, score and threshold quantiles,
    acceptance over training steps and, where the generator's truth is known (built-in
    generator), precision and recall of acceptance.

    \b
    Examples:
      bsgal inspect runs/demo
      bsgal inspect runs/demo --class zebra --decision rejected --rows
      bsgal inspect s3://bucket/run --where "score > 0.2 AND step > 1000" --json
      bsgal inspect runs/demo --csv --table classes > classes.csv
      bsgal inspect runs/demo --html report.html
      bsgal inspect runs/rescored --compare runs/demo
    """
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    names = list(tables)
    if show_rows and "rows" not in names:
        names.append("rows")
    if as_csv and len(names) != 1:
        raise click.UsageError("--csv prints one table: choose it with --table "
                               f"({', '.join(TABLE_NAMES)}) or use --rows alone")
    from pipeline.storage.filesystem import check_output_path, remote_options

    storage = storage_options_from(endpoint_url, storage_pairs)
    if html_path:
        check_output_path(html_path, remote_options(html_path, storage), kind="file",
                          option="--html")
    with _open_query(uri, classes, decisions, reasons, where, remote_options(uri, storage),
                     skip_unreadable) as q:
        if other:
            from pipeline.inspection.compare import compare
            from pipeline.inspection.render import summary_json, summary_text

            with _open_query(other, (), (), (), None, remote_options(other, storage),
                             skip_unreadable) as o:
                result = compare(q, o)
            click.echo(summary_json(result) if as_json else summary_text(result, top=top),
                       nl=False)
            return
        if html_path:
            from pipeline.inspection.report import ReportOptions, write_report

            t0 = time.monotonic()
            options = ReportOptions(thumbs_per_class=thumbs_per_class, thumb_size=thumb_size,
                                    max_classes=max_classes, seed=seed)
            stats = write_report(q, html_path, options, remote_options(html_path, storage))
            click.echo(f"wrote {html_path} ({_human_bytes(stats.bytes)}): {stats.rows} "
                       f"decisions, {stats.thumbnails} thumbnails, galleries for "
                       f"{stats.gallery_classes} of {stats.classes} classes "
                       f"({time.monotonic() - t0:.1f} s)")
            return
        from pipeline.inspection.render import summary_json, summary_text, table_csv
        from pipeline.inspection.tables import summarize

        summary = summarize(q, tuple(names) or None, step_bins=step_bins, row_limit=limit)
        if as_json:
            click.echo(summary_json(summary), nl=False)
        elif as_csv:
            if not summary.tables:  # the truth tables are skipped when truth is unknown
                raise click.ClickException("; ".join(summary.notes))
            click.echo(table_csv(summary.tables[0]), nl=False)
        else:
            click.echo(summary_text(summary, top=top), nl=False)


# ------------------------------------------------------------------------------- export-pool


@click.command("export-pool", context_settings=CONTEXT)
@click.argument("uri")
@click.argument("out")
@click.option("--class", "classes", multiple=True, metavar="NAME|ID",
              help="Only this class (name or id); repeat for several.")
@click.option("--where", "where", metavar="SQL", help=WHERE_HELP)
@click.option("--overwrite", is_flag=True,
              help="Replace a pool already in OUT (the files its pool.json lists).")
@click.option("--skip-unreadable", is_flag=True,
              help="Leave out shard files that cannot be read and say how many.")
@click.option("--xpaste-root", metavar="DIR",
              help="Absolute local folder the pool will be read from, e.g. where `aws s3 sync "
                   "OUT DIR` puts it: the paths in xpaste_pool.json start there (X-Paste's "
                   "loader opens local files). Required when OUT is s3://; default: OUT.")
@storage_flags
@user_errors
def export_pool_command(uri: str, out: str, classes: tuple[str, ...], where: str | None,
                        overwrite: bool, skip_unreadable: bool, xpaste_root: str | None,
                        endpoint_url: str | None, storage_pairs: tuple[str, ...]) -> None:
    """Write a run's accepted instances to OUT as an instance pool for copy-paste training.

    OUT/<class>/<sample_id>.png are RGBA cut-outs cropped to the mask (alpha = mask), indexed
    by class in OUT/pool.json (plus xpaste_pool.json in X-Paste's InstPool format, and
    export.json recording the source and filters). URI and OUT may be local or s3://; an
    s3:// OUT needs --xpaste-root. Exits 1, writing nothing, when no accepted decision matches
    the filters.

    \b
    Example:
      bsgal export-pool runs/demo pools/demo
      bsgal export-pool s3://bucket/run pools/run --where "score > 0.05"
      bsgal export-pool runs/demo s3://bucket/pool --xpaste-root /data/pool
    """
    from pipeline.inspection.export_pool import export_pool
    from pipeline.storage.filesystem import check_output_path, remote_options

    storage = storage_options_from(endpoint_url, storage_pairs)
    check_output_path(out, remote_options(out, storage), kind="folder", option="OUT")
    t0 = time.monotonic()
    with _open_query(uri, classes, ("accepted",), (), where, remote_options(uri, storage),
                     skip_unreadable) as q:
        stats = export_pool(q, out, remote_options(out, storage), overwrite=overwrite,
                            xpaste_root=xpaste_root)
    skipped = (f"; {stats.skipped} accepted rows skipped (listed in export.json)"
               if stats.skipped else "")
    click.echo(f"exported {stats.instances} instances of {stats.classes} classes to {out} "
               f"({_human_bytes(stats.bytes)}, {time.monotonic() - t0:.1f} s){skipped}")

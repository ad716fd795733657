"""A self-contained HTML review report of a run's decisions (``bsgal inspect URI --html F``).

One file, no network: thumbnails are inline JPEG data URIs with the mask outlined (a yellow
line inside a black one, drawn here, so it shows on any background), charts are inline SVG, the
filters are a few lines of plain JavaScript. A reviewer sees, per class, accepted / rejected /
invalid candidates side by side with score, threshold and reason on hover; the score histogram
with the threshold; acceptance over training steps; the per-group and per-class tables.

Large runs stay small: at most ``thumbs_per_class`` thumbnails per class and decision, chosen at
random (reproducibly, from ``seed``), and galleries for at most ``max_classes`` classes (those
with the most candidates). The page says what it shows ("showing 24 of 310").
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json

from pipeline.inspection.costs import NO_COSTS, cost_by_class, cost_by_stage
from pipeline.inspection.feedback import option_acceptance, run_allocation_history
from pipeline.inspection.thresholds import class_thresholds
from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.render import describe_filters, format_value
from pipeline.inspection.run_summary import random_weights_line
from pipeline.inspection.report_charts import (
    allocation_svg,
    cost_svg,
    histogram_svg,
    steps_svg,
    threshold_quantiles,
)
from pipeline.inspection.report_gallery import (
    gallery_classes,
    gallery_html,
    sample_rows,
)
from pipeline.inspection.summary import (
    acceptance_over_steps,
    class_acceptance,
    decision_counts,
    frequency_groups,
    score_quantiles,
    truth_by_failure,
    truth_precision_recall,
)
from pipeline.inspection.table import Table
from pipeline.storage.filesystem import filesystem, is_local, is_uri


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What goes into the page.

    Attributes:
        thumbs_per_class: thumbnails per class and decision, at most.
        thumb_size: longest side of a thumbnail in pixels.
        max_classes: classes with a gallery, at most (those with the most candidates).
        seed: seed of the thumbnail sample.
        histogram_bins: bars of the score histogram.
        step_points: points of the acceptance-over-steps chart, at most.
        jpeg_quality: JPEG quality of the thumbnails (1-95).
    """

    thumbs_per_class: int = 24
    thumb_size: int = 96
    max_classes: int = 60
    seed: int = 0
    histogram_bins: int = 40
    step_points: int = 50
    jpeg_quality: int = 85

    def __post_init__(self) -> None:
        for name in ("thumbs_per_class", "thumb_size", "max_classes", "histogram_bins",
                     "step_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"report option {name}={getattr(self, name)} must be >= 1")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in [1, 95]")


@dataclasses.dataclass
class ReportStats:
    """What a written report holds."""

    path: str
    bytes: int
    rows: int  # selected decisions
    thumbnails: int
    classes: int  # classes among the selected decisions
    gallery_classes: int


# ------------------------------------------------------------------------------------ tables


def table_html(table: Table, table_id: str | None = None) -> str:
    """A summary table as an HTML table (numbers right-aligned)."""
    head = "".join(f"<th>{html.escape(c.name)}</th>" for c in table.columns)
    body = []
    for r in table.rows:
        cells = []
        for c in table.columns:
            cls = ' class="num"' if c.kind != "str" else ""
            cells.append(f"<td{cls}>{html.escape(format_value(r.get(c.name), c.kind))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(table.columns)}">(no rows)</td></tr>')
    ident = f' id="{table_id}"' if table_id else ""
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f"<h3>{html.escape(table.title)}</h3><table{ident}><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>{note}")


# -------------------------------------------------------------------------------------- page

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px;color:#222}
h1{font-size:20px;margin:0 0 4px}
.warning{background:#fde2e1;border:2px solid #c0392b;padding:6px 10px;font-weight:bold}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:16px 0 6px}small{color:#666;font-weight:normal}
table{border-collapse:collapse;margin:4px 0 8px}
th,td{padding:2px 8px;border-bottom:1px solid #eee}
th{text-align:left;background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.note,.legend{color:#666;font-size:12px;margin:2px 0}
.sw{display:inline-block;width:10px;height:10px;vertical-align:middle}
.controls{position:sticky;top:0;background:#fff;padding:8px 0;
border-bottom:1px solid #ddd;z-index:2}
.controls label{margin-right:14px}
.lanes{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.lane{margin:2px 0 8px}
.lane-head{border-left:4px solid;padding-left:6px;color:#444;font-size:12px;margin-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:6px}
.card{margin:0;position:relative;background:#fafafa;border:1px solid #ddd;padding:2px}
.card img{display:block}.noimg{display:flex;align-items:center;justify-content:center;
color:#999;font-size:11px;background:#eee}
.card figcaption{display:none;position:absolute;left:0;right:0;bottom:0;font-size:10px;
background:rgba(0,0,0,.72);color:#fff;padding:1px 3px;overflow:hidden;white-space:nowrap}
.card:hover figcaption{display:block}
.card[data-decision=accepted]{border-color:#2e9e5b}
.card[data-decision=rejected]{border-color:#d9534f}
[hidden]{display:none !important}
"""

# Nothing may be fetched: images are data: URIs, style and script are inline.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")

_JS = """
(function () {
  var byClass = document.getElementById('filter-class');
  var byDecision = document.getElementById('filter-decision');
  var info = document.getElementById('filter-info');
  function apply() {
    var c = byClass.value, d = byDecision.value, shown = 0;
    document.querySelectorAll('section.gallery').forEach(function (s) {
      var classOk = !c || s.dataset.classId === c;
      s.hidden = !classOk;
      s.querySelectorAll('.lane').forEach(function (lane) {
        lane.hidden = !!d && lane.dataset.decision !== d;
        if (classOk && !lane.hidden) { shown += lane.querySelectorAll('.card').length; }
      });
    });
    info.textContent = shown + ' thumbnails match';
  }
  byClass.addEventListener('change', apply);
  byDecision.addEventListener('change', apply);
  apply();
})();
"""


def random_weight_stages_of_rows(q: DecisionQuery) -> list[str]:
    """The stages of the run behind ``q`` that ran random weights, for a report that may have
    only the shards (`run_summary.random_weight_stages` asks the config): generation and
    annotation from the rows' versions (``sd:random-sd15@…``, ``sam:random-vit_h``), training
    from the run's config.yaml where there is one."""
    import yaml

    from pipeline.storage.run_dir import RunDir

    stages = []
    for stage, column in (("generation", "generator"), ("annotation", "annotator")):
        if column in q.columns() and q.rows(
                f"SELECT 1 FROM selected WHERE {column} LIKE '%:random-%' LIMIT 1"):
            stages.append(stage)
    root = q.uri.rstrip("/").removesuffix("/shards")
    try:
        config = yaml.safe_load(RunDir(root, q.storage_options).read_bytes("config.yaml"))
        if (config.get("training") or {}).get("weights", "pretrained") != "pretrained":
            stages.append("training")
    except Exception:  # noqa: BLE001 - no run folder (a shards copy): the rows say the rest
        pass
    return stages


def build_report(q: DecisionQuery, options: ReportOptions | None = None) -> tuple[str, dict]:
    """The report page for ``q``'s selection, and counts of what it shows."""
    options = options or ReportOptions()
    selected = q.count()
    classes_table = class_acceptance(q)
    shown_classes, n_classes = gallery_classes(q, options.max_classes)
    samples = sample_rows(q, [c["class_id"] for c in shown_classes], options.thumbs_per_class,
                          options.seed)
    gallery, thumbs = gallery_html(shown_classes, samples, options.thumb_size,
                                   options.jpeg_quality)
    shown_cards = sum(len(e["rows"]) for e in samples.values())

    truth = truth_precision_recall(q)
    truth_html = (table_html(truth, "truth-table") + table_html(truth_by_failure(q))
                  if truth is not None else
                  '<p class="note">Precision/recall skipped: these rows carry no generator '
                  "truth (truth_failure is empty, e.g. Stable Diffusion candidates).</p>")
    class_options = "".join(
        f'<option value="{int(c["class_id"])}">{html.escape(str(c["class_name"]))}</option>'
        for c in shown_classes)
    gallery_scope = (f"all {n_classes} classes" if len(shown_classes) == n_classes else
                     f"the {len(shown_classes)} classes with the most candidates, of "
                     f"{n_classes} (pick others with --class, or raise --max-classes)")
    sampling = (f"Thumbnails: up to {options.thumbs_per_class} per class and decision, chosen "
                f"at random (seed {options.seed}); {shown_cards} shown of {selected} selected "
                f"decisions; galleries for {gallery_scope}. The mask is outlined in yellow.")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"uri": q.uri, "files": len(q.files), "total_rows": q.count("decisions"),
            "selected_rows": selected, "filters": q.filters.describe(),
            "thumbs_per_class": options.thumbs_per_class, "thumbnails": thumbs,
            "cards": shown_cards, "classes": n_classes,
            "gallery_classes": len(shown_classes), "generated": generated}
    t05, _, t95 = threshold_quantiles(q)
    margin_html = ("<h3>Score relative to the threshold in force (the threshold moved)</h3>"
                   + histogram_svg(q, options.histogram_bins, margin=True)
                   if t05 is not None and t95 > t05 else "")
    cost_table = cost_by_stage(q)
    cost_html = ('<p class="note">Device-seconds per accepted instance by stage (all spent on '
                 "the selected candidates, accepted or not, over the accepted ones).</p>"
                 + cost_svg(cost_table) + table_html(cost_table, "cost-table")
                 + table_html(cost_by_class(q), "cost-classes-table")
                 if cost_table is not None else f'<p class="note">{html.escape(NO_COSTS)}.</p>')
    meta["cost_per_accepted"] = (cost_table.rows[-1]["per_accepted"]
                                 if cost_table is not None else None)
    thresholds_table = class_thresholds(q)
    thresholds_html = (table_html(thresholds_table, "thresholds-table")
                       if thresholds_table is not None else "")
    history = run_allocation_history(q.uri, q.storage_options)
    options_table = option_acceptance(q)
    feedback_html = allocation_svg(history) + (table_html(options_table, "options-table")
                                               if options_table is not None else "")
    meta["allocation_records"] = len(history)
    meta["random_weights"] = random_weight_stages_of_rows(q)
    warning = random_weights_line(meta["random_weights"])
    warning_html = (f'<p class="warning" id="random-weights">{html.escape(warning)}</p>'
                    if warning else "")
    meta_json = json.dumps(meta).replace("<", "\\u003c")  # cannot close the script element
    esc = html.escape
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>bsgal decisions: {esc(q.uri)}</title><style>{_CSS}</style></head>
<body>
<h1>bsgal decisions</h1>
{warning_html}
<p class="meta">{esc(q.uri)} &middot; {meta['total_rows']} decisions in {meta['files']} shard
files &middot; filters: {esc(describe_filters(meta['filters']))} &middot; {selected} selected
&middot; generated {generated}</p>
<p class="meta" id="sampling">{esc(sampling)}</p>
<h2>Summary</h2>
{table_html(decision_counts(q), "counts-table")}
{table_html(frequency_groups(q), "groups-table")}
{truth_html}
<h2>Scores</h2>
{histogram_svg(q, options.histogram_bins)}
{margin_html}
{table_html(score_quantiles(q), "scores-table")}
{thresholds_html}
<h2>Cost: where the time went</h2>
{cost_html}
<h2>Generation allocation over training steps</h2>
{feedback_html}
<h2>Acceptance over training steps</h2>
{steps_svg(acceptance_over_steps(q, options.step_points))}
<h2>Galleries</h2>
<div class="controls">
<label>class <select id="filter-class"><option value="">all classes</option>
{class_options}</select></label>
<label>decision <select id="filter-decision"><option value="">all decisions</option>
<option value="accepted">accepted</option><option value="rejected">rejected</option>
<option value="invalid">invalid</option></select></label>
<span id="filter-info"></span>
<span class="note">Hover a thumbnail for its score, threshold, reason and step.</span>
</div>
{gallery}
<h2>Per class</h2>
{table_html(classes_table, "classes-table")}
<script type="application/json" id="report-meta">{meta_json}</script>
<script>{_JS}</script>
</body></html>
"""
    return page, meta


def write_report(q: DecisionQuery, path: str, options: ReportOptions | None = None,
                 storage_options: dict | None = None) -> ReportStats:
    """Build the report for ``q``'s selection and write it to ``path`` (local or fsspec URI)."""
    page, meta = build_report(q, options)
    data = page.encode("utf-8")
    fs, fpath = filesystem(path, storage_options if is_uri(path) else None)
    if is_local(fs):
        parent = fpath.rsplit("/", 1)[0] if "/" in fpath else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(fpath, "wb") as fh:
        fh.write(data)
    return ReportStats(path=path, bytes=len(data), rows=meta["selected_rows"],
                       thumbnails=meta["thumbnails"], classes=meta["classes"],
                       gallery_classes=meta["gallery_classes"])

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

import base64
import dataclasses
import datetime as _dt
import html
import io
import json

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.inspection.costs import NO_COSTS, cost_by_class, cost_by_stage
from pipeline.inspection.feedback import option_acceptance, run_allocation_history
from pipeline.inspection.query import DecisionQuery, sql_string
from pipeline.inspection.render import describe_filters, format_value
from pipeline.inspection.summary import (
    acceptance_over_steps,
    class_acceptance,
    decision_counts,
    frequency_groups,
    score_quantiles,
    truth_by_failure,
    truth_precision_recall,
)
from pipeline.inspection.table import FREQUENCY_NAMES, Table
from pipeline.storage.filesystem import filesystem, is_local, is_uri
from pipeline.storage.shard_schema import DECISIONS, decode_rle

OUTLINE_INNER = (255, 230, 0)  # yellow, on the mask's edge pixels
OUTLINE_OUTER = (0, 0, 0)  # black, just outside the mask
DECISION_COLORS = {"accepted": "#2e9e5b", "rejected": "#d9534f", "invalid": "#8a8a8a"}


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


# -------------------------------------------------------------------------------- thumbnails


def outlined_thumbnail(image: np.ndarray, mask: np.ndarray | None, size: int) -> np.ndarray:
    """The image scaled so its longest side is ``size`` px, with the mask's outline drawn.

    Args:
        image: H x W x 3 uint8 RGB.
        mask: H x W bool, or None (no outline).
        size: longest side of the result in pixels.

    Returns:
        h x w x 3 uint8 RGB with max(h, w) == size.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST
    thumb = np.array(Image.fromarray(image).resize((tw, th), resample))
    if mask is not None and mask.shape == (h, w) and mask.any():
        m = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (tw, th), Image.Resampling.NEAREST)) > 127
        inner = m & ~ndimage.binary_erosion(m, border_value=0)
        outer = ndimage.binary_dilation(m) & ~m
        thumb[outer] = OUTLINE_OUTER
        thumb[inner] = OUTLINE_INNER
    return thumb


def jpeg_data_uri(rgb: np.ndarray, quality: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_image(png: bytes | None) -> np.ndarray | None:
    if not png:
        return None
    try:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    except Exception:  # a corrupt image becomes a "no image" card, the row still shows
        return None


def _decode_mask(rle: dict | None) -> np.ndarray | None:
    if not rle or not rle.get("counts"):
        return None
    try:
        return decode_rle(rle)
    except Exception:
        return None


# ------------------------------------------------------------------------------------ charts


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _threshold_quantiles(q: DecisionQuery) -> tuple:
    """5 %, 50 % and 95 % quantiles of the threshold over scored candidates (None if none)."""
    return q.con.execute(
        "SELECT quantile_cont(threshold, 0.05), quantile_cont(threshold, 0.5), "
        "quantile_cont(threshold, 0.95) FROM selected "
        "WHERE decision <> 'invalid' AND isfinite(threshold)").fetchone()


def histogram_svg(q: DecisionQuery, bins: int, margin: bool = False) -> str:
    """Stacked histogram of scored candidates (rejected below, accepted above).

    ``margin=False``: of the score, with the threshold's median as a dashed line and its
    5-95 % range shaded. ``margin=True``: of score - threshold (the threshold in force when
    the candidate was decided), so that a moving threshold sits at 0.
    """
    value = "(score - threshold)" if margin else "score"
    where = f"decision <> 'invalid' AND isfinite({value})"
    lo, hi, n = q.con.execute(
        f"SELECT min({value}), max({value}), count(*) FROM selected WHERE {where}").fetchone()
    if not n:
        return '<p class="empty">No scored candidates in this selection.</p>'
    t05, t50, t95 = (0.0, 0.0, 0.0) if margin else _threshold_quantiles(q)
    svg_id, line_id = (("margin-histogram", "margin-zero-line") if margin else
                       ("score-histogram", "threshold-line"))
    axis_label = "score - threshold" if margin else "score"
    x0, x1 = lo, hi
    if t50 is not None:
        x0, x1 = min(x0, t05), max(x1, t95)
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    width = (x1 - x0) / bins
    counts = {d: np.zeros(bins, dtype=np.int64) for d in ("accepted", "rejected")}
    for b, decision, c in q.con.execute(
            f"SELECT least({bins - 1}, greatest(0, floor(({value} - {x0!r}) / {width!r})))"
            "::INT, "
            f"decision, count(*) FROM selected WHERE {where} GROUP BY ALL").fetchall():
        counts[decision][b] += c
    total = counts["accepted"] + counts["rejected"]
    ymax = max(1, int(total.max()))
    W, H, L, R, T, B = 640, 220, 40, 10, 14, 34
    pw, ph = W - L - R, H - T - B

    def sx(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * pw

    parts = [f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="histogram of {axis_label} with threshold">']
    if t50 is not None and t95 > t05:
        parts.append(f'<rect x="{sx(t05):.1f}" y="{T}" width="{sx(t95) - sx(t05):.1f}" '
                     f'height="{ph}" fill="#f0e6a0" opacity="0.6"><title>threshold 5-95 %: '
                     f'{_fmt(t05)} to {_fmt(t95)}</title></rect>')
    bw = pw / bins
    for i in range(bins):
        base = T + ph
        for decision in ("rejected", "accepted"):
            c = int(counts[decision][i])
            if not c:
                continue
            bh = c / ymax * ph
            lo_i, hi_i = x0 + i * width, x0 + (i + 1) * width
            parts.append(
                f'<rect class="bar-{decision}" x="{L + i * bw + 0.5:.1f}" y="{base - bh:.1f}" '
                f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}" '
                f'fill="{DECISION_COLORS[decision]}"><title>{decision}: {c} with '
                f'{axis_label} in [{_fmt(lo_i)}, {_fmt(hi_i)})</title></rect>')
            base -= bh
    parts.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#333"/>')
    parts.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#333"/>')
    parts.append(f'<text x="{L - 4}" y="{T + 4}" text-anchor="end" font-size="10">{ymax}'
                 '</text>')
    parts.append(f'<text x="{L - 4}" y="{T + ph}" text-anchor="end" font-size="10">0</text>')
    parts.append(f'<text x="{L}" y="{H - 18}" font-size="10">{_fmt(x0)}</text>')
    parts.append(f'<text x="{L + pw}" y="{H - 18}" text-anchor="end" font-size="10">'
                 f'{_fmt(x1)}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 4}" text-anchor="middle" font-size="11">'
                 f'{axis_label}</text>')
    if t50 is not None:
        x = sx(t50)
        parts.append(f'<line id="{line_id}" x1="{x:.1f}" y1="{T - 4}" x2="{x:.1f}" '
                     f'y2="{T + ph}" stroke="#222" stroke-width="1.5" stroke-dasharray="4 3">'
                     f'<title>{"threshold" if margin else "threshold (median)"} '
                     f'{_fmt(t50)}</title></line>')
        parts.append(f'<text x="{x + 3:.1f}" y="{T + 8}" font-size="10">threshold '
                     f'{_fmt(t50)}</text>')
    parts.append("</svg>")
    legend = (f'<span class="sw" style="background:{DECISION_COLORS["accepted"]}"></span> '
              f'accepted <span class="sw" style="background:{DECISION_COLORS["rejected"]}">'
              "</span> rejected")
    if margin:
        legend += " &middot; dashed line: the threshold (0 = exactly at the threshold)"
    elif t50 is not None:
        legend += (" &middot; dashed line: median threshold"
                   + (f"; shaded: 5-95 % of thresholds ({_fmt(t05)} to {_fmt(t95)}), the "
                      "threshold moved during the run" if t95 > t05 else ""))
    return "".join(parts) + f'<p class="legend">{legend}</p>'


def steps_svg(table: Table) -> str:
    """Acceptance (of all candidates, and of scored ones dashed) per range of steps."""
    rows = table.rows
    if not rows:
        return '<p class="empty">No training steps recorded in this selection.</p>'
    W, H, L, R, T, B = 640, 200, 40, 10, 12, 34
    pw, ph = W - L - R, H - T - B
    s0, s1 = rows[0]["step_from"], rows[-1]["step_to"]
    span = max(1, s1 - s0 + 1)

    def sx(r: dict) -> float:
        return L + ((r["step_from"] + r["step_to"] + 1) / 2 - s0) / span * pw

    def sy(rate: float) -> float:
        return T + (1 - rate) * ph

    parts = [f'<svg id="steps-chart" xmlns="http://www.w3.org/2000/svg" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="acceptance over '
             'training steps">']
    for level in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{L}" y1="{sy(level):.1f}" x2="{L + pw}" y2="{sy(level):.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{L - 4}" y="{sy(level) + 3:.1f}" text-anchor="end" '
                     f'font-size="10">{int(level * 100)}%</text>')
    for key, dash, color in (("accept_rate", "", "#2e9e5b"),
                             ("accept_rate_scored", ' stroke-dasharray="4 3"', "#1f5fa8")):
        pts = [(sx(r), sy(r[key])) for r in rows if r[key] is not None]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} '
                         'points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
    for r in rows:
        if r["accept_rate"] is None:
            continue
        parts.append(
            f'<circle cx="{sx(r):.1f}" cy="{sy(r["accept_rate"]):.1f}" r="2.5" '
            f'fill="#2e9e5b"><title>steps {r["step_from"]}-{r["step_to"]}: {r["accepted"]} '
            f'of {r["total"]} accepted ({format_value(r["accept_rate"], "rate")}); '
            f'of scored {format_value(r["accept_rate_scored"], "rate")}; median threshold '
            f'{format_value(r["threshold_median"], "float")}</title></circle>')
    parts.append(f'<text x="{L}" y="{H - 18}" font-size="10">{s0}</text>')
    parts.append(f'<text x="{L + pw}" y="{H - 18}" text-anchor="end" font-size="10">{s1}'
                 '</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 4}" text-anchor="middle" font-size="11">'
                 'training step</text></svg>')
    legend = ('<p class="legend"><span class="sw" style="background:#2e9e5b"></span> accepted '
              'of all candidates &middot; <span class="sw" style="background:#1f5fa8"></span> '
              'accepted of scored candidates (dashed)</p>')
    return "".join(parts) + legend


STAGE_COLORS = {"generate": "#1f5fa8", "annotate": "#7a52a3", "check": "#999999",
                "score": "#d9822b", "train": "#2e9e5b"}


def cost_svg(table: Table) -> str:
    """Where the time went: one bar per stage, its device-seconds per accepted instance
    (length) and its share of all (label)."""
    rows = [r for r in table.rows if r["stage"] != "all"]
    top = max((r["per_accepted"] or 0.0) for r in rows) if rows else 0.0
    if not rows or top <= 0:
        return '<p class="empty">No device time recorded in this selection.</p>'
    W, L, R, bar, gap = 640, 80, 170, 18, 8
    H = len(rows) * (bar + gap) + gap
    pw = W - L - R
    parts = [f'<svg id="cost-chart" xmlns="http://www.w3.org/2000/svg" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="device time per '
             'accepted instance by stage">']
    for i, r in enumerate(rows):
        y = gap + i * (bar + gap)
        value = r["per_accepted"] or 0.0
        width = value / top * pw
        label = (f'{_fmt(value)} {html.escape(r["unit"])} '
                 f'({format_value(r["share"], "rate")})')
        parts.append(f'<text x="{L - 6}" y="{y + bar - 5}" text-anchor="end" font-size="11">'
                     f'{html.escape(r["stage"])}</text>')
        parts.append(f'<rect class="cost-bar" data-stage="{html.escape(r["stage"])}" x="{L}" '
                     f'y="{y}" width="{width:.1f}" height="{bar}" '
                     f'fill="{STAGE_COLORS.get(r["stage"], "#555")}"><title>{r["stage"]}: '
                     f'{_fmt(r["device_seconds"])} {html.escape(r["unit"])} in all, '
                     f'{label} per accepted instance</title></rect>')
        parts.append(f'<text x="{L + width + 6:.1f}" y="{y + bar - 5}" font-size="11">'
                     f'{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


CLASS_COLORS = ("#1f5fa8", "#d9822b", "#2e9e5b", "#c0392b", "#7a52a3", "#8c6d31",
                "#e377c2", "#555555", "#17becf", "#bcbd22", "#9edae5", "#ff9896")


def allocation_svg(history: list[dict]) -> str:
    """Each class's share of generation over training steps (the closed loop's allocation
    records; the classes with the largest shares, at most ``len(CLASS_COLORS)``)."""
    if not history:
        return ('<p class="note">Open loop (feedback.policy open_loop): the classes were drawn '
                'with fixed weights, so there is no allocation over time to show.</p>')
    peak: dict[str, float] = {}
    for h in history:
        for name, share in h["shares"].items():
            peak[name] = max(peak.get(name, 0.0), share)
    names = sorted(peak, key=lambda n: -peak[n])[: len(CLASS_COLORS)]
    top = max(max(peak.values()), 1e-9)
    W, H, L, R, T, B = 640, 220, 40, 150, 12, 34
    pw, ph = W - L - R, H - T - B
    s0, s1 = history[0]["step"], history[-1]["step"]
    span = max(1, s1 - s0)

    def sx(step: int) -> float:
        return L + (step - s0) / span * pw

    def sy(share: float) -> float:
        return T + (1 - share / top) * ph

    parts = [f'<svg id="allocation-chart" xmlns="http://www.w3.org/2000/svg" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="share of generation '
             'by class over training steps">']
    for level in (0.0, top / 2, top):
        parts.append(f'<line x1="{L}" y1="{sy(level):.1f}" x2="{L + pw}" y2="{sy(level):.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{L - 4}" y="{sy(level) + 3:.1f}" text-anchor="end" '
                     f'font-size="10">{100 * level:.0f}%</text>')
    for i, name in enumerate(names):
        color = CLASS_COLORS[i]
        pts = " ".join(f"{sx(h['step']):.1f},{sy(h['shares'].get(name, 0.0)):.1f}"
                       for h in history)
        parts.append(f'<polyline class="allocation-line" data-class="{html.escape(name)}" '
                     f'fill="none" stroke="{color}" stroke-width="1.5" points="{pts}">'
                     f'<title>{html.escape(name)}</title></polyline>')
        y = T + 4 + i * 14
        parts.append(f'<rect x="{L + pw + 10}" y="{y}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{L + pw + 24}" y="{y + 9}" font-size="10">'
                     f'{html.escape(name[:22])}</text>')
    parts.append(f'<text x="{L}" y="{H - 18}" font-size="10">{s0}</text>')
    parts.append(f'<text x="{L + pw}" y="{H - 18}" text-anchor="end" font-size="10">{s1}'
                 '</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 4}" text-anchor="middle" font-size="11">'
                 'training step</text></svg>')
    stopped = sorted({n for h in history for n in h["stopped"]})
    gone = [h for h in history if h.get("unavailable")]
    notes = []
    if stopped:
        notes.append("stopped at their target: " + ", ".join(stopped))
    if gone:
        notes.append(f"demand actor unavailable from step {gone[0]['step']}: open loop after")
    return "".join(parts) + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


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


# --------------------------------------------------------------------------------- galleries


def _gallery_classes(q: DecisionQuery, max_classes: int) -> tuple[list[dict], int]:
    """Classes that get a gallery (most candidates first, then shown by name), and how many
    classes the selection has."""
    classes = q.rows(
        "SELECT class_id, any_value(class_name) AS class_name, "
        "any_value(class_frequency) AS class_frequency, count(*) AS total FROM selected "
        "GROUP BY class_id ORDER BY total DESC, class_id")
    chosen = classes[:max_classes]
    chosen.sort(key=lambda c: (str(c["class_name"]), c["class_id"]))
    return chosen, len(classes)


def _sample(q: DecisionQuery, class_ids: list[int], per_class: int, seed: int) -> dict:
    """Up to ``per_class`` rows per (class, decision), chosen by a seeded hash of sample_id.

    Returns ``{(class_id, decision): {"total": n, "rows": [row, ...]}}``; rows carry the
    image PNG and the mask RLE.
    """
    if not class_ids:
        return {}
    ids = ", ".join(str(int(c)) for c in class_ids)
    salt = sql_string(f"#{seed}")
    totals = q.rows(
        f"SELECT class_id, decision, count(*) AS n FROM selected WHERE class_id IN ({ids}) "
        "GROUP BY ALL")
    out: dict = {(r["class_id"], r["decision"]): {"total": r["n"], "rows": []} for r in totals}
    # Pick from the light columns first, then read the images of the picked rows only.
    picked = q.rows(
        "SELECT * FROM (SELECT sample_id, class_id, decision, reason, score, threshold, step, "
        "rank, prompt, truth_failure, row_number() OVER (PARTITION BY class_id, decision "
        f"ORDER BY md5(sample_id || {salt})) AS k FROM selected WHERE class_id IN ({ids})) "
        f"WHERE k <= {int(per_class)} ORDER BY class_id, decision, k")
    media = q.media([r["sample_id"] for r in picked])
    for r in picked:
        r.update(media.get((r["sample_id"], r["class_id"], r["decision"]),
                           {"image_png": None, "mask_rle": None}))
        out[(r["class_id"], r["decision"])]["rows"].append(r)
    return out


def _card(row: dict, options: ReportOptions) -> tuple[str, bool]:
    """One thumbnail card (HTML) and whether it holds an image."""
    score = format_value(row["score"], "float")
    threshold = format_value(row["threshold"], "float")
    hover = [f"score {score} (threshold {threshold})", f"reason {row['reason']}",
             f"step {row['step']}, rank {row['rank']}", f"sample {row['sample_id']}"]
    if row.get("truth_failure"):
        hover.append(f"generator truth: {row['truth_failure']}")
    if row.get("prompt"):
        hover.append(f"prompt: {row['prompt']}")
    title = html.escape("\n".join(hover), quote=True)
    caption = html.escape(f"{score} · {row['reason']}")
    image = _decode_image(row.get("image_png"))
    common = (f'class="card" data-decision="{html.escape(str(row["decision"]), quote=True)}" '
              f'data-sample="{html.escape(str(row["sample_id"]), quote=True)}" '
              f'data-score="{score}" data-reason="{html.escape(str(row["reason"]), quote=True)}" '
              f'title="{title}"')
    if image is None:
        return (f'<figure {common}><div class="noimg" style="width:{options.thumb_size}px;'
                f'height:{options.thumb_size}px">no image</div><figcaption>{caption}'
                "</figcaption></figure>", False)
    mask = _decode_mask(row.get("mask_rle"))
    thumb = outlined_thumbnail(image, mask, options.thumb_size)
    th, tw = thumb.shape[:2]
    uri = jpeg_data_uri(thumb, options.jpeg_quality)
    alt = html.escape(f"{row['decision']} {row['sample_id']}", quote=True)
    return (f'<figure {common}><img src="{uri}" width="{tw}" height="{th}" alt="{alt}">'
            f"<figcaption>{caption}</figcaption></figure>", True)


def _gallery_html(classes: list[dict], samples: dict, options: ReportOptions) -> tuple[str, int]:
    """One section per class with a lane per decision (side by side), and the number of
    thumbnails drawn."""
    sections = []
    thumbs = 0
    for c in classes:
        lanes = []
        totals = []
        for decision in DECISIONS:
            entry = samples.get((c["class_id"], decision))
            if not entry:
                continue
            cards = []
            for row in entry["rows"]:
                card, has_image = _card(row, options)
                cards.append(card)
                thumbs += has_image
            shown = len(entry["rows"])
            totals.append(f"{entry['total']} {decision}")
            note = (f"{decision}: showing {shown} of {entry['total']}"
                    + (" (random sample)" if shown < entry["total"] else ""))
            lanes.append(
                f'<div class="lane" data-decision="{decision}"><div class="lane-head" '
                f'style="border-color:{DECISION_COLORS[decision]}">{html.escape(note)}</div>'
                f'<div class="cards">{"".join(cards)}</div></div>')
        # Class names and groups come from the shards: text, never markup.
        group = html.escape(str(FREQUENCY_NAMES.get(c["class_frequency"], c["class_frequency"])))
        name = html.escape(str(c["class_name"]), quote=True)
        sections.append(
            f'<section class="gallery" data-class-id="{int(c["class_id"])}" '
            f'data-class="{name}">'
            f"<h3>{name} <small>(id {int(c['class_id'])}, {group}; {', '.join(totals)})</small>"
            f'</h3><div class="lanes">{"".join(lanes)}</div></section>')
    return "".join(sections), thumbs


# -------------------------------------------------------------------------------------- page

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px;color:#222}
h1{font-size:20px;margin:0 0 4px}
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


def build_report(q: DecisionQuery, options: ReportOptions | None = None) -> tuple[str, dict]:
    """The report page for ``q``'s selection, and counts of what it shows."""
    options = options or ReportOptions()
    selected = q.count()
    classes_table = class_acceptance(q)
    gallery_classes, n_classes = _gallery_classes(q, options.max_classes)
    samples = _sample(q, [c["class_id"] for c in gallery_classes], options.thumbs_per_class,
                      options.seed)
    gallery, thumbs = _gallery_html(gallery_classes, samples, options)
    shown_cards = sum(len(e["rows"]) for e in samples.values())

    truth = truth_precision_recall(q)
    truth_html = (table_html(truth, "truth-table") + table_html(truth_by_failure(q))
                  if truth is not None else
                  '<p class="note">Precision/recall skipped: these rows carry no generator '
                  "truth (truth_failure is empty, e.g. Stable Diffusion candidates).</p>")
    class_options = "".join(
        f'<option value="{int(c["class_id"])}">{html.escape(str(c["class_name"]))}</option>'
        for c in gallery_classes)
    gallery_scope = (f"all {n_classes} classes" if len(gallery_classes) == n_classes else
                     f"the {len(gallery_classes)} classes with the most candidates, of "
                     f"{n_classes} (pick others with --class, or raise --max-classes)")
    sampling = (f"Thumbnails: up to {options.thumbs_per_class} per class and decision, chosen "
                f"at random (seed {options.seed}); {shown_cards} shown of {selected} selected "
                f"decisions; galleries for {gallery_scope}. The mask is outlined in yellow.")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"uri": q.uri, "files": len(q.files), "total_rows": q.count("decisions"),
            "selected_rows": selected, "filters": q.filters.describe(),
            "thumbs_per_class": options.thumbs_per_class, "thumbnails": thumbs,
            "cards": shown_cards, "classes": n_classes,
            "gallery_classes": len(gallery_classes), "generated": generated}
    t05, _, t95 = _threshold_quantiles(q)
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
    history = run_allocation_history(q.uri, q.storage_options)
    options_table = option_acceptance(q)
    feedback_html = allocation_svg(history) + (table_html(options_table, "options-table")
                                               if options_table is not None else "")
    meta["allocation_records"] = len(history)
    meta_json = json.dumps(meta).replace("<", "\\u003c")  # cannot close the script element
    esc = html.escape
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>bsgal decisions: {esc(q.uri)}</title><style>{_CSS}</style></head>
<body>
<h1>bsgal decisions</h1>
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

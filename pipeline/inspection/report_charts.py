"""The report's charts as inline SVG: the score histogram with the thresholds, acceptance over
steps, where the device time went, and the allocation over time (closed loop)."""

from __future__ import annotations

import html

import numpy as np

from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.render import format_value
from pipeline.inspection.table import Table

DECISION_COLORS = {"accepted": "#2e9e5b", "rejected": "#d9534f", "invalid": "#8a8a8a"}


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def threshold_quantiles(q: DecisionQuery) -> tuple:
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
    t05, t50, t95 = (0.0, 0.0, 0.0) if margin else threshold_quantiles(q)
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

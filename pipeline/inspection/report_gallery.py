"""The report's galleries: per class, a lane per decision of thumbnails with the mask outlined
(a yellow line inside a black one, drawn here, so it shows on any background), as inline JPEG
data URIs; a reproducible random sample of each class's rows."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.inspection.query import DecisionQuery, sql_string
from pipeline.inspection.render import format_value
from pipeline.inspection.report_charts import DECISION_COLORS
from pipeline.inspection.table import FREQUENCY_NAMES
from pipeline.storage.shard_schema import DECISIONS, decode_rle

OUTLINE_INNER = (255, 230, 0)  # yellow, on the mask's edge pixels
OUTLINE_OUTER = (0, 0, 0)  # black, just outside the mask


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


def gallery_classes(q: DecisionQuery, max_classes: int) -> tuple[list[dict], int]:
    """Classes that get a gallery (most candidates first, then shown by name), and how many
    classes the selection has."""
    classes = q.rows(
        "SELECT class_id, any_value(class_name) AS class_name, "
        "any_value(class_frequency) AS class_frequency, count(*) AS total FROM selected "
        "GROUP BY class_id ORDER BY total DESC, class_id")
    chosen = classes[:max_classes]
    chosen.sort(key=lambda c: (str(c["class_name"]), c["class_id"]))
    return chosen, len(classes)


def sample_rows(q: DecisionQuery, class_ids: list[int], per_class: int, seed: int) -> dict:
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


def _card(row: dict, thumb_size: int, jpeg_quality: int) -> tuple[str, bool]:
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
        return (f'<figure {common}><div class="noimg" style="width:{thumb_size}px;'
                f'height:{thumb_size}px">no image</div><figcaption>{caption}'
                "</figcaption></figure>", False)
    mask = _decode_mask(row.get("mask_rle"))
    thumb = outlined_thumbnail(image, mask, thumb_size)
    th, tw = thumb.shape[:2]
    uri = jpeg_data_uri(thumb, jpeg_quality)
    alt = html.escape(f"{row['decision']} {row['sample_id']}", quote=True)
    return (f'<figure {common}><img src="{uri}" width="{tw}" height="{th}" alt="{alt}">'
            f"<figcaption>{caption}</figcaption></figure>", True)


def gallery_html(classes: list[dict], samples: dict, thumb_size: int, jpeg_quality: int
                 ) -> tuple[str, int]:
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
                card, has_image = _card(row, thumb_size, jpeg_quality)
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

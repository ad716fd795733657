"""Export the accepted instances of a run as an instance pool for copy-paste training.

Layout (that of X-Paste and the BSGAL reference code: one RGBA cut-out per instance, cropped to
its mask's box, foldered by class, plus a JSON index)::

    OUT/<class_name>/<sample_id>.png   RGBA, alpha = 255 on the mask, 0 elsewhere
    OUT/pool.json                      {"<class_id>": [{"file": "<class_name>/<sample_id>.png",
                                          "sample_id", "class_name", "score", "threshold",
                                          "step", "width", "height", "box", ...}, ...]}
    OUT/xpaste_pool.json               X-Paste's InstPool index: {"<class_id - 1>":
                                          ["*<absolute path>", ...]} (LVIS ids are 1-based;
                                          "*" marks a ready RGBA cut-out)
    OUT/export.json                    where the pool came from: source URI, filters, counts,
                                          and every accepted row that could not be exported

The indexes are written last, so a folder with ``pool.json`` holds a finished export. The
cut-out's RGB is the generated image's pixels inside the box; its alpha is exactly
``mask * 255`` there, so ``png[..., 3] > 0`` gives the stored mask back.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import posixpath
import re
from typing import Any

import numpy as np

from annotators import cutout
from PIL import Image

from pipeline.inspection.query import DecisionQuery
from pipeline.errors import UserError
from pipeline.storage.filesystem import filesystem, is_local, is_uri
from pipeline.storage.shards import decode_rle

POOL_INDEX = "pool.json"
XPASTE_INDEX = "xpaste_pool.json"
EXPORT_RECORD = "export.json"


class PoolExistsError(UserError, FileExistsError):
    """The output folder already holds a pool (and overwriting was not asked for)."""


@dataclasses.dataclass
class PoolStats:
    """What an export wrote."""

    out: str
    instances: int
    classes: int
    skipped: int
    bytes: int


def rgba_cutout(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The object as RGBA cropped to its mask's box (``annotators.cutout``), with the box.

    Returns:
        (h x w x 4 uint8 RGBA with alpha = mask * 255, box ``(x0, y0, x1, y1)`` end-exclusive
        in image pixels).
    """
    return cutout.rgba_cutout(image, mask), cutout.mask_box(mask)


_UNSAFE = re.compile(r"[^\w.()+,=@-]+")


def class_folder(name: str, class_id: int) -> str:
    """A folder name for a class: the name with path separators and odd characters replaced
    by ``_`` (LVIS names such as ``bow_(weapon)`` stay as they are)."""
    safe = _UNSAFE.sub("_", name).strip("._")
    return safe or f"class_{class_id}"


def _png_bytes(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def export_pool(q: DecisionQuery, out: str, storage_options: dict | None = None,
                overwrite: bool = False, batch_rows: int = 64) -> PoolStats:
    """Write the accepted rows of ``q``'s selection to ``out`` as an instance pool.

    Rows are streamed from the shards in batches (memory stays bounded by ``batch_rows``
    images). An accepted row whose image or mask cannot be decoded, or whose mask is empty or
    of another size, is not exported; it is listed with its reason in ``export.json`` and
    counted in the returned stats.

    Raises:
        PoolExistsError: ``out`` already holds ``pool.json`` and ``overwrite`` is False.
    """
    fs, root = filesystem(out, storage_options if is_uri(out) else None)
    root = root.rstrip("/")
    local = is_local(fs)
    index_path = f"{root}/{POOL_INDEX}"
    if fs.exists(index_path):
        if not overwrite:
            raise PoolExistsError(f"{out} already holds an instance pool ({POOL_INDEX}); "
                                  "choose another folder or pass --overwrite")
        _remove_pool(fs, root)
    if local:
        fs.makedirs(root, exist_ok=True)

    pool: dict[str, list[dict[str, Any]]] = {}
    xpaste: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    folders: dict[int, str] = {}
    used_folders: set[str] = set()
    written = 0
    reader = q.batches(
        "SELECT sample_id, class_id, class_name, class_frequency, score, threshold, step, "
        "rank, prompt, seed, generator, annotator, mask_score, area_ratio, image_png, "
        "mask_rle FROM shard_rows WHERE decision = 'accepted' AND sample_id IN "
        "(SELECT sample_id FROM selected WHERE decision = 'accepted')",
        batch_rows)
    for batch in reader:
        for row in batch.to_pylist():
            try:
                image = np.asarray(Image.open(io.BytesIO(row["image_png"])).convert("RGB"))
                mask = decode_rle(row["mask_rle"])
                rgba, box = rgba_cutout(image, mask)
            except Exception as exc:  # listed in export.json, never dropped silently
                why = "no image" if not row["image_png"] else (
                    "no mask" if not row["mask_rle"] else f"{type(exc).__name__}: {exc}")
                skipped.append({"sample_id": row["sample_id"], "why": why})
                continue
            cid = int(row["class_id"])
            if cid not in folders:
                folder = class_folder(str(row["class_name"]), cid)
                if folder in used_folders:
                    folder = f"{folder}_{cid}"
                folders[cid] = folder
                used_folders.add(folder)
                if local:
                    fs.makedirs(f"{root}/{folder}", exist_ok=True)
            rel = f"{folders[cid]}/{class_folder(str(row['sample_id']), cid)}.png"
            data = _png_bytes(rgba)
            with fs.open(f"{root}/{rel}", "wb") as fh:
                fh.write(data)
            written += len(data)
            pool.setdefault(str(cid), []).append({
                "file": rel,
                "sample_id": row["sample_id"],
                "class_id": cid,
                "class_name": row["class_name"],
                "class_frequency": row["class_frequency"],
                "score": _finite(row["score"]),
                "threshold": _finite(row["threshold"]),
                "step": row["step"],
                "rank": row["rank"],
                "width": int(rgba.shape[1]),
                "height": int(rgba.shape[0]),
                "box": list(box),
                "image_size": [int(image.shape[0]), int(image.shape[1])],
                "area": int(mask.sum()),
                "prompt": row["prompt"],
                "seed": row["seed"],
                "generator": row["generator"],
                "annotator": row["annotator"],
                "mask_score": _finite(row["mask_score"]),
            })
            full = os.path.abspath(f"{root}/{rel}") if local else fs.unstrip_protocol(
                f"{root}/{rel}")
            xpaste.setdefault(str(cid - 1), []).append("*" + full)

    # Rows stream in shard order; the indexes are sorted by class id, then sample id.
    pool = {k: sorted(v, key=lambda e: e["sample_id"])
            for k, v in sorted(pool.items(), key=lambda kv: int(kv[0]))}
    xpaste = {k: sorted(v) for k, v in sorted(xpaste.items(), key=lambda kv: int(kv[0]))}
    record = {
        "format": "bsgal-instance-pool",
        "version": 1,
        "source": q.uri,
        "filters": q.filters.describe(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "instances": sum(len(v) for v in pool.values()),
        "classes": {cid: {"name": v[0]["class_name"], "folder": posixpath.dirname(v[0]["file"]),
                          "instances": len(v)} for cid, v in pool.items()},
        "skipped": skipped,
    }
    for name, doc in ((POOL_INDEX, pool), (XPASTE_INDEX, xpaste), (EXPORT_RECORD, record)):
        with fs.open(f"{root}/{name}", "wb") as fh:
            fh.write(json.dumps(doc, indent=1).encode())
    return PoolStats(out=out, instances=record["instances"], classes=len(pool),
                     skipped=len(skipped), bytes=written)


def _remove_pool(fs: Any, root: str) -> None:
    """Delete a previous export: the files its index lists, its index files, and the class
    folders left empty. Other files in the folder are kept."""
    with fs.open(f"{root}/{POOL_INDEX}", "rb") as fh:
        old = json.loads(fh.read())
    folders = set()
    for entries in old.values():
        for e in entries:
            path = f"{root}/{e['file']}"
            folders.add(posixpath.dirname(path))
            if fs.exists(path):
                fs.rm(path)
    for name in (POOL_INDEX, XPASTE_INDEX, EXPORT_RECORD):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    for folder in folders:
        if is_local(fs) and fs.exists(folder) and not fs.ls(folder):
            fs.rmdir(folder)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None

"""Export the accepted instances of a run as an instance pool for copy-paste training.

Layout (that of X-Paste and the BSGAL reference code: one RGBA cut-out per instance, cropped to
its mask's box, foldered by class, plus a JSON index)::

    OUT/<class_name>/<sample_id>.png   RGBA, alpha = 255 on the mask, 0 elsewhere
    OUT/pool.json                      {"<class_id>": [{"file": "<class_name>/<sample_id>.png",
                                          "sample_id", "class_name", "score", "threshold",
                                          "step", "width", "height", "box", ...}, ...]}
    OUT/xpaste_pool.json               X-Paste's InstPool index: {"<class_id - 1>":
                                          ["*<absolute path>", ...]} (LVIS ids are 1-based;
                                          "*" marks a ready RGBA cut-out; the paths are
                                          local: OUT's, or ``xpaste_root``'s for a pool
                                          synced elsewhere, e.g. from s3://)
    OUT/export.json                    where the pool came from: source URI, filters, counts,
                                          and every accepted row that could not be exported

The indexes are written last, so a folder with ``pool.json`` holds a finished export. The
cut-out's RGB is the generated image's pixels inside the box; its alpha is exactly
``mask * 255`` there, so ``png[..., 3] > 0`` gives the stored mask back.

Class names and sample ids come from the shards, so they are untrusted: each becomes one
folder or file name of safe characters (:func:`class_folder`; never empty, ``.`` or ``..``),
two ids that become the same name get distinct files, and every path is checked to stay
inside ``OUT`` after links are resolved (a link in ``OUT`` that leads elsewhere is not
followed). ``--overwrite`` deletes only the files the old ``pool.json`` lists inside ``OUT``.
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
from PIL import Image

from annotators import cutout
from pipeline.errors import UserError
from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.render import describe_filters
from pipeline.storage.filesystem import filesystem, is_local, is_uri
from pipeline.storage.shard_schema import decode_rle

POOL_INDEX = "pool.json"
XPASTE_INDEX = "xpaste_pool.json"
EXPORT_RECORD = "export.json"


class PoolExistsError(UserError, FileExistsError):
    """The output folder already holds a pool (and overwriting was not asked for)."""


class PoolPathError(UserError):
    """A path of the export would lead outside the output folder."""


class NothingToExportError(UserError):
    """No accepted decision matches the filters: nothing would be exported."""


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
    """A folder name for a class: the name with path separators (``/``, ``\\``), NUL and other
    odd characters replaced by ``_`` and leading/trailing dots removed, so it is one path
    component and never ``.`` or ``..`` (LVIS names such as ``bow_(weapon)`` stay as they
    are); ``class_<id>`` when nothing is left."""
    safe = _UNSAFE.sub("_", name).strip("._")
    return safe or f"class_{class_id}"


class _Inside:
    """Whether paths under ``root`` stay in it: lexically, and for local folders also after
    links are resolved."""

    def __init__(self, root: str, local: bool) -> None:
        self.root, self.local = root, local
        self.real = os.path.realpath(root) if local else None

    def __call__(self, rel: str) -> bool:
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
            return False
        if not self.local:
            return True
        real = os.path.realpath(os.path.join(self.root, rel))
        return real.startswith(self.real.rstrip(os.sep) + os.sep)


def _png_bytes(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def export_pool(q: DecisionQuery, out: str, storage_options: dict | None = None,
                overwrite: bool = False, batch_rows: int = 64,
                xpaste_root: str | None = None) -> PoolStats:
    """Write the accepted rows of ``q``'s selection to ``out`` as an instance pool.

    Rows are streamed from the shards in batches (memory stays bounded by ``batch_rows``
    images). An accepted row whose image or mask cannot be decoded, or whose mask is empty or
    of another size, is not exported; it is listed with its reason in ``export.json`` and
    counted in the returned stats.

    ``xpaste_root``: the local folder the pool will be read from by X-Paste (absolute; where
    ``aws s3 sync OUT DIR`` puts it); the ``xpaste_pool.json`` paths start there. Required
    for a remote ``out`` (X-Paste's loader opens local files only); default: ``out`` itself.

    Raises:
        PoolExistsError: ``out`` already holds ``pool.json`` and ``overwrite`` is False.
        NothingToExportError: no accepted row matches the filters (nothing is written).
        PoolPathError: ``xpaste_root`` is missing for a remote ``out`` or not an absolute
            local path, or a path would lead outside ``out``.
    """
    if xpaste_root is not None and (is_uri(xpaste_root) or not os.path.isabs(xpaste_root)):
        raise PoolPathError(f"--xpaste-root {xpaste_root!r}: give an absolute local folder "
                            f"(X-Paste's loader opens the paths in {XPASTE_INDEX} as local "
                            "files)")
    if xpaste_root is None and is_uri(out):
        raise PoolPathError(
            f"{out}: X-Paste's loader opens the paths in {XPASTE_INDEX} as local files, so "
            "they cannot be s3:// URIs; give --xpaste-root DIR, the absolute local folder you "
            f"will sync the pool to (aws s3 sync {out} DIR), or export to a local folder and "
            "sync that")
    (matching,) = q.rows("SELECT count(*) AS n FROM selected WHERE decision = 'accepted'")
    if not matching["n"]:
        raise NothingToExportError(
            f"nothing to export: no accepted decision of {q.uri} matches the filters "
            f"({describe_filters(q.filters.describe())}); {out} was not written")
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
    inside = _Inside(root, local)

    pool: dict[str, list[dict[str, Any]]] = {}
    xpaste: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    folders: dict[int, str] = {}
    used_folders: set[str] = set()
    used_files: set[str] = set()
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
                name = class_folder(str(row["class_name"]), cid)
                folder = next((f for f in (name, f"{name}_{cid}", f"class_{cid}")
                               if f not in used_folders and inside(f)), None)
                if folder is None:
                    raise PoolPathError(f"{out}: no folder for class {cid} stays inside it "
                                        f"({root}/{name} is a link that leads outside); remove "
                                        "the link or export to an empty folder")
                folders[cid] = folder
                used_folders.add(folder)
                if local:
                    fs.makedirs(f"{root}/{folder}", exist_ok=True)
            stem = f"{folders[cid]}/{class_folder(str(row['sample_id']), cid)}"
            rel, k = f"{stem}.png", 1
            while rel in used_files:  # two sample ids that became the same file name
                rel, k = f"{stem}_{k}.png", k + 1
            if not inside(rel):
                raise PoolPathError(f"{out}: {rel} is a link that leads outside the folder; "
                                    "remove it or export to an empty folder")
            used_files.add(rel)
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
            full = (os.path.join(xpaste_root, *rel.split("/")) if xpaste_root is not None
                    else os.path.abspath(f"{root}/{rel}"))
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
        "xpaste_root": xpaste_root,
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
    inside = _Inside(root, is_local(fs))
    folders = set()
    for entries in old.values():
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not inside(
                    e["file"]):
                continue  # an index entry that points outside the pool is never followed
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

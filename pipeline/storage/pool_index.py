"""The index of an instance pool: which entries each class has, read once on the driver.

A pool is one of (``generation.pool_format``; ``auto`` tells them apart):

- ``xpaste``: X-Paste's / DiverGen's instance-pool JSON, ``{"<LVIS id - 1>": [entry, ...]}``,
  each entry ``*PATH`` (a ready RGBA cut-out), ``IMG|MASK`` (an image and a greyscale mask)
  or ``PATH`` (an RGBA image to threshold, keep the largest part of and crop); pools built by
  their scripts lie as ``images/<id - 1>/<n>.png`` beside the JSON;
- ``bsgal``: the ``pool.json`` that ``bsgal export-pool`` writes (by class id, entries with
  ``file``, ``sample_id``, ``class_name``, ``mask_score``), or the folder holding it;
- ``shards``: the decision shards of an earlier run (its folder or its ``shards/``), the rows
  of ``generation.pool_decisions`` (default: accepted);
- ``images``: a folder of plain images per class, ``ROOT/<class name>/<file>.{png,jpg,...}``
  (e.g. a text-to-image model's output kept by prompt), which still need masks: the run's
  annotator (SAM or the built-in one) cuts them out. Never guessed by ``auto``.

Each format is a :class:`PoolFormat` in one table (:func:`register_pool_format`): its reader,
how ``auto`` recognises it, whether its entries bring masks (an ``images`` pool's do not: the
annotation stage cuts them out) and mask scores, and whether its entries are decision rows
whose sample ids a rescoring keeps. A new format is a reader and one registration; entries
use the reference forms :mod:`pipeline.run.pool_entries` opens.

Entry paths are opened as written when absolute or a URI, else against the JSON's folder;
``path_map`` (``{prefix: replacement}``, longest prefix first) rewrites them first, e.g. the
absolute paths of an X-Paste JSON built on another machine to ``s3://bucket/pool``.

The index holds no image: per class a run of entries in two :class:`PackedStrings` (the
entry reference a worker opens, and the id the pool gives the entry), plus the mask score
where the pool records one. 10⁶ entries of 100-character paths take ~230 MB as packed bytes
and int64 offsets (Python strings would take ~3 x that); the driver keeps it, the workers never
see it: each candidate row carries its own entry reference.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Callable
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.storage.filesystem import filesystem, is_uri
from pipeline.storage.shard_schema import DECISIONS, ShardSchemaError
from pipeline.storage.shards import locate_shards

#: The reference prefix of an entry that is one row of a shard file: ``shard:<uri>#<row>``.
SHARD_REF = "shard:"
#: The reference prefix of a plain image that still needs a mask: ``image:<path>``.
IMAGE_REF = "image:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
XPASTE_LAYOUT = ('{"<LVIS id - 1>": ["*/path/cut-out.png", "/path/img.jpg|/path/mask.png", '
                 '"/path/rgba.png", ...], ...}')


class PoolFormatError(UserError, ValueError):
    """A pool in the wrong layout: the message names the file, what is wrong and the fix."""


class PackedStrings:
    """Many strings as one UTF-8 byte buffer and int64 offsets (``len(self) + 1`` of them).

    ``strings[i]`` decodes string ``i``; memory is the bytes plus 8 per string.
    """

    def __init__(self, items: Iterable[str]) -> None:
        encoded = [s.encode() for s in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)


@dataclasses.dataclass
class PoolIndex:
    """A pool's entries grouped by class (see the module docstring).

    Attributes:
        uri: the pool as given (JSON file, folder or run).
        format: one of :data:`POOL_FORMATS`.
        class_ids: int64 [C], the pool's class ids (LVIS ids), ascending.
        starts: int64 [C + 1]; class ``k``'s entries are ``starts[k]:starts[k + 1]``.
        refs: [N] what a worker opens (a form prefix and resolved paths, or a shard row).
        source_ids: [N] the entry's own id in the pool (the X-Paste entry as written, the
            sample id of a bsgal pool or of a shard row).
        mask_scores: float32 [N], NaN where the pool records none (X-Paste pools).
        class_names: class id → the name the pool gives it (bsgal pools and shards only).
        needs_masks: its entries are plain images that the run's annotator cuts out.
        keeps_sample_ids: its entries carry the sample ids of the decision rows they came from
            (a run's shards; a bsgal export-pool folder), which a rescoring keeps so that it
            joins that run on ``sample_id``.
    """

    uri: str
    format: str
    class_ids: np.ndarray
    starts: np.ndarray
    refs: PackedStrings
    source_ids: PackedStrings
    mask_scores: np.ndarray
    class_names: dict[int, str]
    needs_masks: bool = False
    keeps_sample_ids: bool = False

    @property
    def counts(self) -> np.ndarray:
        """int64 [C], entries per class."""
        return np.diff(self.starts)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def has_mask_scores(self) -> bool:
        """Whether every candidate will have a mask score: a pool of plain images is annotated
        in the run (the annotator scores each mask); other pools where they record one."""
        return self.needs_masks or not bool(np.isnan(self.mask_scores).all())

    @property
    def nbytes(self) -> int:
        """Memory of the index's arrays (bytes)."""
        return (self.refs.nbytes + self.source_ids.nbytes + self.mask_scores.nbytes
                + self.class_ids.nbytes + self.starts.nbytes)


def pool_index_of(uri: str, fmt: str, by_class: dict[int, list[tuple[str, str, float]]],
                  names: dict[int, str]) -> PoolIndex:
    """The index of a pool from its entries per class: ``{class id: [(reference, the entry's
    id in the pool, mask score or NaN), ...]}`` and the names the pool gives its classes (what
    every format's reader returns); PoolFormatError for a pool without entries."""
    ids = sorted(by_class)
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(by_class[c]) for c in ids], out=starts[1:])
    entries = [e for c in ids for e in by_class[c]]
    if not entries:
        known = _FORMATS.get(fmt)
        raise PoolFormatError(f"{uri}: the pool holds no entries; expected "
                              f"{known.layout if known else fmt}"
                              + (" (check generation.pool_decisions)" if fmt == "shards" else
                                 "; export one with `bsgal export-pool RUN POOL`"
                                 if fmt == "bsgal" else ""))
    return PoolIndex(uri=uri, format=fmt, class_ids=np.asarray(ids, dtype=np.int64),
                     starts=starts, refs=PackedStrings(e[0] for e in entries),
                     source_ids=PackedStrings(e[1] for e in entries),
                     mask_scores=np.asarray([e[2] for e in entries], dtype=np.float32),
                     class_names=names)


# ------------------------------------------------------------------------------ paths


def resolve_path(path: str, base: str, path_map: dict[str, str] | None = None) -> str:
    """Where an entry path lies: ``path_map``'s longest matching prefix replaced, then
    absolute paths and URIs as they are and relative ones under ``base`` (the JSON's folder);
    a relative path that leaves ``base`` (``../``) is not followed: it becomes
    ``ESCAPING_REF + path``, which the entry reader turns into an ``invalid_pool_entry``."""
    for prefix in sorted(path_map or {}, key=len, reverse=True):
        if path.startswith(prefix):
            path = path_map[prefix] + path[len(prefix):]
            break
    if is_uri(path) or path.startswith("/"):
        return path
    inside = posixpath.normpath(path)
    if inside == ".." or inside.startswith("../"):
        return ESCAPING_REF + path  # the reader makes it an invalid_pool_entry row
    return posixpath.join(base, inside)


#: Marks a relative entry path that leaves the pool's folder (`resolve_path`).
ESCAPING_REF = "escapes-the-pool-folder:"


def xpaste_ref(entry: str, base: str, path_map: dict[str, str] | None = None) -> str:
    """An X-Paste entry with its path(s) resolved, its form kept: ``*P``, ``I|M`` or ``P``."""
    if entry.startswith("*"):
        return "*" + resolve_path(entry[1:], base, path_map)
    if "|" in entry:
        image, _, mask = entry.partition("|")
        return resolve_path(image, base, path_map) + "|" + resolve_path(mask, base, path_map)
    return resolve_path(entry, base, path_map)


# ------------------------------------------------------------------------------ formats


def _read_json(uri: str, storage_options: dict | None) -> Any:
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        raise PoolFormatError(f"generation.pool: {uri} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoolFormatError(f"{uri}: not a JSON file ({exc}); a pool index is "
                              f"{XPASTE_LAYOUT}") from None


def _base(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/"))


def _class_key(uri: str, key: Any, offset: int) -> int:
    try:
        return int(key) + offset
    except (TypeError, ValueError):
        raise PoolFormatError(
            f"{uri}: key {key!r} is not a class number; an X-Paste pool is keyed by LVIS id - 1 "
            f"as a string ({XPASTE_LAYOUT}); a pool keyed by class name must be re-keyed") \
            from None


def read_xpaste(uri: str, storage_options: dict | None = None,
                path_map: dict[str, str] | None = None) -> PoolIndex:
    """The index of an X-Paste / DiverGen pool JSON (keys LVIS id - 1, entries strings)."""
    doc = _read_json(uri, storage_options)
    if not isinstance(doc, dict):
        raise PoolFormatError(f"{uri}: the pool is a JSON {type(doc).__name__}, not an object; "
                              f"expected {XPASTE_LAYOUT}")
    base = _base(uri)
    by_class: dict[int, list[tuple[str, str, float]]] = {}
    for key, entries in doc.items():
        cid = _class_key(uri, key, 1)
        if not isinstance(entries, list):
            raise PoolFormatError(f"{uri}: key {key!r} holds a {type(entries).__name__}, not a "
                                  f"list of entries; expected {XPASTE_LAYOUT}")
        rows = by_class.setdefault(cid, [])
        for n, entry in enumerate(entries):
            if not isinstance(entry, str) or not entry.strip("*|"):
                raise PoolFormatError(
                    f"{uri}: entry {n} of key {key!r} is {entry!r}, not a path; entries are "
                    "'*PATH' (RGBA cut-out), 'IMG|MASK' or 'PATH' (RGBA to threshold)")
            rows.append((xpaste_ref(entry, base, path_map), entry, float("nan")))
    del doc
    return pool_index_of(uri, "xpaste", by_class, {})


def read_bsgal_pool(uri: str, storage_options: dict | None = None,
                    path_map: dict[str, str] | None = None) -> PoolIndex:
    """The index of a ``pool.json`` written by ``bsgal export-pool`` (keys class ids)."""
    doc = _read_json(uri, storage_options)
    if not isinstance(doc, dict):
        raise PoolFormatError(f"{uri}: not a bsgal pool.json (a JSON object keyed by class id)")
    base = _base(uri)
    by_class: dict[int, list[tuple[str, str, float]]] = {}
    names: dict[int, str] = {}
    for key, entries in doc.items():
        cid = _class_key(uri, key, 0)
        rows = by_class.setdefault(cid, [])
        for n, entry in enumerate(entries if isinstance(entries, list) else [None]):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise PoolFormatError(
                    f"{uri}: entry {n} of class {key} has no 'file'; a bsgal pool.json maps a "
                    "class id to entries {\"file\": \"<class>/<id>.png\", ...} (an X-Paste JSON "
                    "needs generation.pool_format=xpaste)")
            names.setdefault(cid, str(entry.get("class_name", "")))
            score = entry.get("mask_score")
            rows.append(("*" + resolve_path(entry["file"], base, path_map),
                         str(entry.get("sample_id", entry["file"])),
                         float(score) if isinstance(score, (int, float)) else float("nan")))
    return pool_index_of(uri, "bsgal", by_class, names)


def read_shard_pool(uri: str, decisions: Sequence[str] = ("accepted",),
                    storage_options: dict | None = None) -> PoolIndex:
    """The index of an earlier run's decision rows (``decisions`` partitions), read without
    their images; a reference is ``shard:<file uri>#<row>``."""
    unknown = [d for d in decisions if d not in DECISIONS]
    if unknown:
        raise PoolFormatError(f"generation.pool_decisions: {unknown} not among {DECISIONS}")
    try:
        fs, _, files = locate_shards(uri, storage_options)
    except ShardSchemaError as exc:
        raise PoolFormatError(f"generation.pool: {exc}") from None
    by_class: dict[int, list[tuple[str, str, float]]] = {}
    names: dict[int, str] = {}
    for path in files:
        if posixpath.basename(posixpath.dirname(path)).partition("=")[2] not in decisions:
            continue
        table = pq.read_table(path, filesystem=fs,
                              columns=["sample_id", "class_id", "class_name", "mask_score"])
        where = fs.unstrip_protocol(path) if is_uri(uri) else path
        for row, (sid, cid, name, score) in enumerate(zip(
                *(table.column(c).to_pylist() for c in table.column_names))):
            names.setdefault(int(cid), str(name))
            by_class.setdefault(int(cid), []).append(
                (f"{SHARD_REF}{where}#{row}", str(sid),
                 float("nan") if score is None else float(score)))
    return pool_index_of(uri, "shards", by_class, names)


def read_image_folder(uri: str, class_ids: dict[str, int],
                      storage_options: dict | None = None) -> PoolIndex:
    """The index of ``ROOT/<class name>/<image>`` (``class_ids``: class name → id of the
    run's vocabulary). A folder whose name is no class is an error naming it; files that are
    not images by their suffix are left out (a ``README`` beside them is not a candidate)."""
    import difflib

    fs, root = filesystem(uri, storage_options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise PoolFormatError(f"generation.pool: {uri} is not a folder; an images pool is "
                              "ROOT/<class name>/<image>.png|jpg")
    by_class: dict[int, list[tuple[str, str, float]]] = {}
    names: dict[int, str] = {}
    for folder in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(folder.rstrip("/"))
        if not fs.isdir(folder) or name.startswith("."):
            continue
        if name not in class_ids:
            close = difflib.get_close_matches(name, list(class_ids), n=1, cutoff=0.6)
            raise PoolFormatError(
                f"{uri}: folder {name!r} is not a class of the training set"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + " (an images pool has one folder per class, named as in train.json)")
        cid = class_ids[name]
        names[cid] = name
        rows = by_class.setdefault(cid, [])
        for path in sorted(fs.ls(folder, detail=False)):
            if posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES:
                where = fs.unstrip_protocol(path) if is_uri(uri) else path
                rows.append((IMAGE_REF + where, f"{name}/{posixpath.basename(path)}",
                             float("nan")))
    return pool_index_of(uri, "images", {c: r for c, r in by_class.items() if r}, names)


# ------------------------------------------------------------------------------ the formats


@dataclasses.dataclass(frozen=True)
class PoolRequest:
    """What a format's reader is given: the file or folder to read and the run's settings."""

    uri: str
    decisions: tuple[str, ...] = ("accepted",)
    storage_options: dict | None = None
    path_map: dict[str, str] | None = None
    class_ids: dict[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class PoolFormat:
    """One pool layout (module docstring).

    Attributes:
        name: the ``generation.pool_format`` value.
        read: the reader: a `PoolRequest` → the `PoolIndex`.
        recognise: for ``auto``: ``(fs, path, uri)`` → the file or folder to read when the
            pool at ``uri`` is in this layout, else None; None: never guessed.
        needs_masks: its entries are plain images that the annotation stage cuts out.
        keeps_sample_ids: its entries carry the sample ids of the rows they came from (a
            rescoring keeps them).
        layout: the layout in one line, for errors.
    """

    name: str
    read: Callable[[PoolRequest], PoolIndex]
    recognise: Callable[[Any, str, str], str | None] | None = None
    needs_masks: bool = False
    keeps_sample_ids: bool = False
    layout: str = ""


_FORMATS: dict[str, PoolFormat] = {}


def register_pool_format(fmt: PoolFormat) -> PoolFormat:
    """Add ``fmt`` to the table (``auto`` tries the recognisers in registration order)."""
    if fmt.name == "auto":
        raise ValueError("'auto' is not a pool format name")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_pool_format(name: str) -> None:
    _FORMATS.pop(name, None)


def pool_format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def pool_format(name: str) -> PoolFormat:
    """The format called ``name``; PoolFormatError naming the key, the formats and the closest."""
    found = _FORMATS.get(name)
    if found is None:
        import difflib

        close = difflib.get_close_matches(str(name), list(_FORMATS), n=1)
        raise PoolFormatError(f"generation.pool_format: {name!r} is not auto or one of "
                              f"{list(_FORMATS)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    return found


def needs_masks(name: str) -> bool:
    """Whether a pool of format ``name`` (``auto`` never guesses a mask-less one) still needs
    the annotation stage."""
    return name != "auto" and pool_format(name).needs_masks


def detect_format(uri: str, storage_options: dict | None = None) -> tuple[PoolFormat, str]:
    """``(format, the file or folder to read)`` of a pool given as a JSON file, a folder with
    ``pool.json``, or a run folder with shards (the registered recognisers, in order)."""
    fs, path = filesystem(uri, storage_options)
    path = path.rstrip("/")
    if not fs.exists(path):
        if path.endswith(".json"):
            raise PoolFormatError(f"generation.pool: {uri} does not exist")
        raise PoolFormatError(f"generation.pool: {uri} does not exist (give an X-Paste pool "
                              "JSON, a folder written by bsgal export-pool, or a run folder)")
    for fmt in _FORMATS.values():
        target = fmt.recognise(fs, path, uri) if fmt.recognise is not None else None
        if target is not None:
            return fmt, target
    raise PoolFormatError(
        f"generation.pool: {uri} holds neither pool.json (bsgal export-pool), nor shards/ (a "
        "run), and is not a .json file; give the X-Paste pool JSON itself, e.g. "
        f"{uri.rstrip('/')}/<name>.json, or set generation.pool_format")


def read_pool(uri: str, fmt: str = "auto", *, decisions: Sequence[str] = ("accepted",),
              storage_options: dict | None = None,
              path_map: dict[str, str] | None = None,
              class_ids: dict[str, int] | None = None) -> PoolIndex:
    """The :class:`PoolIndex` of a pool (``fmt``: ``auto`` or a registered format).

    Raises:
        PoolFormatError: the pool is missing, empty or in the wrong layout (the message names
            the file and the fix), or the format is unknown.
    """
    if fmt == "auto":
        kind, target = detect_format(uri, storage_options)
    else:  # the format is given; where a folder is given, its file as the format finds it
        kind, target = pool_format(fmt), uri
        if kind.recognise is not None and not _is_json(uri.rstrip("/")):
            fs, path = filesystem(uri, storage_options)
            if fs.isdir(path.rstrip("/")):
                target = kind.recognise(fs, path.rstrip("/"), uri) or uri
    index = kind.read(PoolRequest(target, tuple(decisions), storage_options, path_map,
                                  class_ids))
    return dataclasses.replace(index, needs_masks=kind.needs_masks,
                               keeps_sample_ids=kind.keeps_sample_ids)


def _is_json(path: str) -> bool:
    return path.endswith(".json")


def _xpaste_entries(fs: Any, path: str) -> bool:
    """Whether the pool JSON at ``path`` holds X-Paste entries (strings) rather than bsgal's
    (objects with ``file``): the first entry found decides."""
    try:
        with fs.open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError):
        return False  # the reader says what is wrong with it
    if isinstance(doc, dict):
        for entries in doc.values():
            if isinstance(entries, list) and entries:
                return isinstance(entries[0], str)
    return False


def _recognise_bsgal(fs: Any, path: str, uri: str) -> str | None:
    """A folder with ``pool.json``, or a ``pool.json`` itself, unless its entries are X-Paste's
    (an X-Paste pool saved as pool.json is read as one)."""
    if posixpath.basename(path) == "pool.json":
        return None if _xpaste_entries(fs, path) else uri
    if not _is_json(path) and fs.exists(f"{path}/pool.json"):
        return None if _xpaste_entries(fs, f"{path}/pool.json") else f"{uri.rstrip('/')}/pool.json"
    return None


register_pool_format(PoolFormat(
    "bsgal", lambda r: read_bsgal_pool(r.uri if _is_json(r.uri.rstrip("/")) else
                                       f"{r.uri.rstrip('/')}/pool.json",
                                       r.storage_options, r.path_map),
    recognise=_recognise_bsgal, keeps_sample_ids=True,
    layout="the pool.json of bsgal export-pool (by class id, entries with 'file')"))
register_pool_format(PoolFormat(
    "xpaste", lambda r: read_xpaste(r.uri, r.storage_options, r.path_map),
    recognise=lambda fs, path, uri: uri if _is_json(path) else (
        f"{uri.rstrip('/')}/pool.json" if fs.exists(f"{path}/pool.json")
        and _xpaste_entries(fs, f"{path}/pool.json") else None),
    layout=XPASTE_LAYOUT))
register_pool_format(PoolFormat(
    "shards", lambda r: read_shard_pool(r.uri, r.decisions, r.storage_options),
    recognise=lambda fs, path, uri: uri if not _is_json(path) and (
        fs.exists(f"{path}/shards") or any(fs.exists(f"{path}/decision={d}")
                                           for d in DECISIONS)) else None,
    keeps_sample_ids=True, layout="a run folder or its shards/"))
register_pool_format(PoolFormat(
    "images", lambda r: read_image_folder(r.uri, r.class_ids or {}, r.storage_options),
    needs_masks=True, layout="ROOT/<class name>/<image>.png|jpg"))

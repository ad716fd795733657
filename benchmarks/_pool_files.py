"""X-Paste-layout instance pools on disk, for the pool-source test and benchmark.

``write_xpaste_pool(folder, cutouts)`` writes what X-Paste's and DiverGen's pool scripts
write: ``folder/images/<LVIS id - 1>/<n>.png`` (RGBA cut-outs, alpha = mask) and
``folder/pool.json`` ``{"<LVIS id - 1>": ["*<absolute path>", ...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from annotators.cutout import rgba_cutout


def write_xpaste_pool(folder: str | Path, cutouts: Iterable[Mapping[str, Any]],
                      name: str = "xpaste_pool.json") -> Path:
    """Write ``cutouts`` (rows with ``class_id`` (LVIS id), ``image`` H x W x 3 uint8 and
    ``mask`` H x W bool) as an X-Paste pool; returns the JSON's path."""
    folder = Path(folder).resolve()
    index: dict[str, list[str]] = {}
    for row in cutouts:
        key = str(int(row["class_id"]) - 1)
        entries = index.setdefault(key, [])
        path = folder / "images" / key / f"{len(entries)}.png"
        if not entries:
            path.parent.mkdir(parents=True, exist_ok=True)
        rgba = rgba_cutout(np.asarray(row["image"]), np.asarray(row["mask"], dtype=bool))
        Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
        entries.append(f"*{path}")
    out = folder / name
    out.write_text(json.dumps(index))
    return out

"""The table model of ``bsgal inspect``: named tables of typed columns, and a summary of them.

Every table builder (:mod:`pipeline.inspection.summary`, :mod:`pipeline.inspection.costs`,
:mod:`pipeline.inspection.feedback`, :mod:`pipeline.inspection.compare`) returns a
:class:`Table`; :mod:`pipeline.inspection.render` prints them and the HTML report shows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: LVIS frequency letters as the tables name them.
FREQUENCY_NAMES = {"f": "frequent", "c": "common", "r": "rare", "": "unknown"}


@dataclasses.dataclass(frozen=True)
class Column:
    """One column: ``kind`` says how to print it (``str``, ``int``, ``float``, ``rate``)."""

    name: str
    kind: str = "str"


@dataclasses.dataclass
class Table:
    """A named table: column specs, rows as dicts keyed by column name, an optional note."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    note: str = ""
    # Text output may elide the middle of a long ranked table (best and worst rows kept).
    ranked: bool = False

    def records(self) -> list[dict[str, Any]]:
        return [{c.name: row.get(c.name) for c in self.columns} for row in self.rows]


@dataclasses.dataclass
class Summary:
    """All tables of one inspection plus what they cover."""

    uri: str
    files: int
    total_rows: int
    selected_rows: int
    filters: dict[str, Any]
    tables: list[Table]
    notes: list[str]

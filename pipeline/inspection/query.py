"""DuckDB views over the decision shards of one run, with the user's filters applied.

DuckDB reads the Parquet files directly (only the columns a query names). Local files are read
by DuckDB's own reader; for s3:// (or any other fsspec URI) the fsspec filesystem is registered
with DuckDB, so the endpoint and credentials in the storage options are used and no DuckDB
extension has to be downloaded. Three relations exist on the connection:

- ``shard_rows``: every row of every shard with all columns, plus the hive partition column
  ``decision`` (``accepted`` / ``rejected`` / ``invalid``); NaN in the float columns (not
  computed, e.g. the score of an invalid candidate) reads as SQL NULL, so that comparisons
  leave such rows out;
- ``decisions``: the same without the large ``image_png`` and ``mask_rle`` columns; a view
  over local shards, a table read once for remote ones (so a summary of a few dozen queries
  downloads the shards once, and never their images);
- ``selected``: the rows of ``decisions`` that pass the filters (``--class``, ``--decision``,
  ``--reason``, ``--where``), combined with AND.

The ``--where`` predicate is the user's text inside a query, so it is checked by DuckDB's own
parser first (:func:`check_predicate`): exactly one boolean expression, no subquery, table
function, set operation, comment or ``;``. It filters the rows the other filters kept (it can
only narrow them), and once the relations exist the connection may read the shard files and
nothing else (``enable_external_access = false`` with the shard files as ``allowed_paths``,
then ``lock_configuration``), so even a predicate that got past the checks could not read or
write any other file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Sequence

import duckdb
import pyarrow as pa

from pipeline.errors import UserError, did_you_mean, duckdb_error_line
from pipeline.storage.filesystem import is_local
from pipeline.storage.shard_schema import DECISIONS, not_computed_floats
from pipeline.storage.shards import locate_shards

if TYPE_CHECKING:
    import fsspec




# Large columns, left out of ``decisions``/``selected``; read from ``shard_rows`` by key.
MEDIA_COLUMNS = ("image_png", "mask_rle")


class QueryError(UserError, ValueError):
    """A filter the shards cannot answer: a bad ``--where`` predicate, an unknown class."""


@dataclasses.dataclass(frozen=True)
class DecisionFilter:
    """Which decision rows to look at; every non-empty field must hold (AND).

    Attributes:
        classes: class names or numeric class ids; a row matches any of them.
        decisions: subset of ``accepted``, ``rejected``, ``invalid``.
        reasons: reasons (``rejected_score``, ``invalid_empty_mask``) or patterns with ``*``
            (``invalid_*``); a row matches any of them.
        where: one boolean SQL expression over the shard columns, run by DuckDB (``score > 0.1
            AND step < 100``); see :func:`check_predicate` for what it may hold.
    """

    classes: tuple[str, ...] = ()
    decisions: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    where: str | None = None

    def __post_init__(self) -> None:
        for d in self.decisions:
            if d not in DECISIONS:
                raise QueryError(f"decision {d!r} is not one of {', '.join(DECISIONS)}")

    def describe(self) -> dict[str, Any]:
        """The filters that are set, as plain data (for report headers and JSON output)."""
        out: dict[str, Any] = {}
        if self.classes:
            out["class"] = list(self.classes)
        if self.decisions:
            out["decision"] = list(self.decisions)
        if self.reasons:
            out["reason"] = list(self.reasons)
        if self.where:
            out["where"] = self.where
        return out


def sql_string(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


WHERE_ALLOWED = ("one boolean expression over the shard columns: comparisons, AND/OR/NOT, "
                 "IN (...) lists, LIKE, BETWEEN, IS NULL and scalar functions, e.g. "
                 "\"score > 0.1 AND class_name = 'cat'\"")


def _where_error(option: str, predicate: str, problem: str) -> QueryError:
    return QueryError(f"{option} {predicate!r}: {problem}; give {WHERE_ALLOWED}")


def _nodes(tree: Any):
    """Every dict in a parsed (``json_serialize_sql``) tree, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_predicate(con: duckdb.DuckDBPyConnection, predicate: str,
                    option: str = "--where") -> None:
    """Accept exactly one boolean expression, or raise :class:`QueryError` naming ``option``.

    The text is checked twice, by DuckDB itself: its tokenizer (no comment, no ``;``, every
    parenthesis closed in order, so the text cannot close the parentheses it is put in) and
    its parser on ``SELECT * FROM t WHERE (<predicate>)``, the shape it is run in: one
    statement, a plain select from ``t`` with no set operation, grouping, ordering, limit or
    sample, and no subquery or table function (``read_parquet``, ``read_csv``, ...) in the
    condition. Whether the columns exist is left to the binder (the caller runs it).
    """
    if not predicate.strip():
        raise _where_error(option, predicate, "the predicate is empty")
    tokens = duckdb.tokenize(predicate)
    depth = 0
    for k, (start, kind) in enumerate(tokens):
        end = tokens[k + 1][0] if k + 1 < len(tokens) else len(predicate)
        text = predicate[start:end]
        if kind == duckdb.token_type.comment:
            raise _where_error(option, predicate, "comments (-- or /* */) are not allowed")
        if kind != duckdb.token_type.operator:
            continue
        for ch in text:
            if ch == ";":
                raise _where_error(option, predicate, "';' is not allowed (one expression, "
                                   "not several statements)")
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                raise _where_error(option, predicate, "unbalanced parentheses (a ')' closes "
                                   "more than the predicate opened)")
    if depth:
        raise _where_error(option, predicate, "unbalanced parentheses (a '(' is not closed)")
    (serialized,) = con.execute("SELECT json_serialize_sql(?)",
                                [f"SELECT * FROM t WHERE ({predicate})"]).fetchall()[0]
    parsed = json.loads(serialized)
    if parsed.get("error"):
        raise _where_error(option, predicate, "not an expression DuckDB can parse ("
                           f"{parsed.get('error_message') or 'syntax error'})")
    statements = parsed.get("statements") or []
    if len(statements) != 1:
        raise _where_error(option, predicate, "it must be one expression, not several "
                           "statements")
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    plain = (node.get("type") == "SELECT_NODE" and source.get("type") == "BASE_TABLE"
             and source.get("table_name") == "t" and not source.get("sample")
             and not node.get("modifiers") and not node.get("group_expressions")
             and not node.get("group_sets") and node.get("having") is None
             and node.get("qualify") is None and node.get("sample") is None
             and not (node.get("cte_map") or {}).get("map"))
    if not plain:
        raise _where_error(option, predicate, "it must be a condition only (no UNION, ORDER BY, "
                           "GROUP BY, LIMIT or other clauses)")
    where = node.get("where_clause")
    table_functions = None
    for n in _nodes(where):
        if n.get("class") == "SUBQUERY" or n.get("type") == "SUBQUERY":
            raise _where_error(option, predicate, "subqueries (SELECT, EXISTS, IN (SELECT ...)) "
                               "are not allowed")
        if n.get("class") == "FUNCTION":
            if table_functions is None:
                table_functions = {name.lower() for (name,) in con.execute(
                    "SELECT DISTINCT function_name FROM duckdb_functions() "
                    "WHERE function_type IN ('table', 'table_macro')").fetchall()}
            name = str(n.get("function_name", "")).lower()
            if name in table_functions:
                raise _where_error(option, predicate, f"table function {name}() is not allowed "
                                   "(the predicate sees the shard columns only)")


def _reason_sql(pattern: str) -> str:
    if "*" in pattern:
        like = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"reason LIKE {sql_string(like.replace('*', '%'))} ESCAPE '\\'"
    return f"reason = {sql_string(pattern)}"


class DecisionQuery:
    """The decisions of one run on a DuckDB connection (``shard_rows``, ``decisions`` and the
    filtered ``selected``; see the module docstring).

    Args:
        uri: run folder or its ``shards`` folder, local path or fsspec URI (``s3://b/run``).
        filters: rows to keep in ``selected``.
        storage_options: fsspec options for remote URIs (``endpoint_url``, ``key``, ...).
        threads: DuckDB worker threads.

    Raises:
        pipeline.storage.shards.ShardSchemaError: no shards, or another schema version.
        pipeline.storage.shards.StorageError: the storage cannot be read.
        QueryError: a filter names a class or reason that no row has, or ``where`` is not a
            valid predicate (DuckDB's message).
    """

    def __init__(
        self,
        uri: str,
        filters: DecisionFilter | None = None,
        storage_options: dict | None = None,
        threads: int = 2,
        skip_unreadable: bool = False,
    ) -> None:
        self.uri = uri
        self.filters = filters or DecisionFilter()
        self.storage_options = dict(storage_options or {})
        #: shard files left out because they cannot be read (``skip_unreadable``)
        self.skipped: list[str] = []
        fs, self.shards_path, files = locate_shards(uri, self.storage_options, can_skip=True,
                                                    skip_unreadable=skip_unreadable,
                                                    skipped=self.skipped)
        self.fs = fs
        self.files = files
        # No extension auto-install: that would reach the network.
        self.con = duckdb.connect(config={"threads": max(1, int(threads)),
                                          "autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False})
        try:
            sources = self._create_views(fs, files)
            self._lock_down(sources)
            self._create_selected()
        except BaseException:
            self.con.close()
            raise

    def _create_views(self, fs: "fsspec.AbstractFileSystem", files: list[str]) -> list[str]:
        """``shard_rows`` and ``decisions``; returns the shard files as DuckDB reads them."""
        if is_local(fs):
            sources = files
        else:
            self.con.register_filesystem(fs)
            sources = [fs.unstrip_protocol(p) for p in files]
        file_list = "[" + ", ".join(sql_string(s) for s in sources) + "]"
        # NaN ("not computed") becomes NULL: in DuckDB NaN > x is true, so "score > 0.1" would
        # otherwise select the unscored invalid rows.
        present = {r[0] for r in self.con.execute(
            f"DESCRIBE SELECT * FROM read_parquet({file_list}, union_by_name = true)").fetchall()}
        nan_to_null = ", ".join(f"CASE WHEN isnan({c}) THEN NULL ELSE {c} END AS {c}"
                                for c in not_computed_floats() if c in present)
        self.con.execute(
            f"CREATE VIEW shard_rows AS SELECT * REPLACE ({nan_to_null}) FROM "
            f"read_parquet({file_list}, hive_partitioning = true, union_by_name = true)")
        media = ", ".join(MEDIA_COLUMNS)
        # Remote shards are read once (without images) instead of once per query.
        kind = "VIEW" if is_local(fs) else "TEMP TABLE"
        self.con.execute(f"CREATE {kind} decisions AS SELECT * EXCLUDE ({media}) FROM shard_rows")
        return sources

    def _create_selected(self) -> None:
        # The user's predicate filters only what the other filters kept, and sits in the very
        # shape check_predicate parsed it in ("SELECT * FROM t WHERE (...)").
        trusted = self._where_sql()
        where = self.filters.where
        if where:
            self._checked_predicate(where)
        user = f" WHERE ({where})" if where else ""
        self.con.execute(f"CREATE VIEW selected AS SELECT * FROM (SELECT * FROM decisions WHERE "
                         f"{trusted}) AS t{user}")

    def _lock_down(self, sources: list[str]) -> None:
        """From now on the connection reads the shard files and nothing else, and no query can
        change that (defence in depth behind :func:`check_predicate`)."""
        self.con.execute("SET allowed_paths = ?", [list(sources)])
        ((temp,),) = self.con.execute("SELECT current_setting('temp_directory')").fetchall()
        if temp:  # spilling of large sorts and joins stays possible
            self.con.execute("SET allowed_directories = ?", [[str(temp)]])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    # ---------------------------------------------------------------------------- filters

    def _where_sql(self) -> str:
        f = self.filters
        conditions = ["TRUE"]
        if f.classes:
            conditions.append(self._class_condition(f.classes))
        if f.decisions:
            conditions.append("decision IN (" + ", ".join(sql_string(d) for d in f.decisions)
                              + ")")
        if f.reasons:
            conditions.append(self._reason_condition(f.reasons))
        return " AND ".join(conditions)

    def _class_condition(self, classes: Sequence[str]) -> str:
        known = self.con.execute(
            "SELECT DISTINCT class_id, class_name FROM decisions ORDER BY class_id").fetchall()
        ids = {str(i) for i, _ in known}
        names = {n for _, n in known}
        alternatives = []
        for c in classes:
            if c in names:
                alternatives.append(f"class_name = {sql_string(c)}")
            elif c in ids:
                alternatives.append(f"class_id = {int(c)}")
            else:
                listing = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
                hint = did_you_mean(c, names) or did_you_mean(c.lower(), names)
                raise QueryError(f"--class {c!r}: no decision of this run has that class name "
                                 f"or id{hint}; classes here: {listing}")
        return "(" + " OR ".join(alternatives) + ")"

    def _reason_condition(self, reasons: Sequence[str]) -> str:
        alternatives = []
        for r in reasons:
            cond = _reason_sql(r)
            (hits,) = self.con.execute(f"SELECT count(*) FROM decisions WHERE {cond}").fetchone()
            if not hits:
                present = [x for (x,) in self.con.execute(
                    "SELECT DISTINCT reason FROM decisions ORDER BY 1").fetchall()]
                raise QueryError(f"--reason {r!r}: no decision of this run has that reason; "
                                 f"reasons here: {', '.join(present)}")
            alternatives.append(cond)
        return "(" + " OR ".join(alternatives) + ")"

    def _checked_predicate(self, predicate: str) -> None:
        check_predicate(self.con, predicate)
        try:  # the binder: columns, types and functions exist
            self.con.execute(f"SELECT count(*) FROM decisions AS t WHERE ({predicate})").fetchall()
        except duckdb.Error as exc:
            raise QueryError(f"--where {predicate!r}: {duckdb_error_line(exc)}") from None

    # ---------------------------------------------------------------------------- queries

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run ``sql`` (it may name the views) and return its rows as dicts, NaN → None."""
        cur = self.con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [{n: _clean(v) for n, v in zip(names, row)} for row in cur.fetchall()]

    def batches(self, sql: str, batch_rows: int = 256) -> pa.RecordBatchReader:
        """Run ``sql`` and stream its result in record batches of about ``batch_rows`` rows."""
        relation = self.con.sql(sql)
        # DuckDB 2 calls it to_arrow_reader, 1.x fetch_arrow_reader.
        reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
        return reader(batch_rows)

    def media(self, sample_ids: Sequence[str], chunk: int = 1000) -> dict[tuple, dict]:
        """Image PNG and mask RLE of the given samples.

        Returns ``{(sample_id, class_id, decision): {"image_png": bytes | None, "mask_rle":
        dict | None}}``. Only these rows' images are read (DuckDB pushes the IN list into the
        Parquet scan).
        """
        out: dict[tuple, dict] = {}
        ids = list(dict.fromkeys(sample_ids))
        for i in range(0, len(ids), chunk):
            listing = ", ".join(sql_string(str(x)) for x in ids[i:i + chunk])
            for r in self.rows("SELECT sample_id, class_id, decision, image_png, mask_rle "
                               f"FROM shard_rows WHERE sample_id IN ({listing})"):
                out[(r["sample_id"], r["class_id"], r["decision"])] = {
                    "image_png": r["image_png"], "mask_rle": r["mask_rle"]}
        return out

    def columns(self, view: str = "selected") -> set[str]:
        """The column names of ``view`` (shards of older schemas lack the newer columns)."""
        return set(self.con.sql(f"SELECT * FROM {view} LIMIT 0").columns)

    def count(self, view: str = "selected") -> int:
        (n,) = self.con.execute(f"SELECT count(*) FROM {view}").fetchone()
        return int(n)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "DecisionQuery":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

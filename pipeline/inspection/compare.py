"""``bsgal inspect A --compare B``: two judgements of the same candidates side by side.

A and B are any two sets of decision shards whose rows share ``sample_id`` (a run and its
``bsgal rescore``, or two rescorings of one source with different checkpoints). B (the
``--compare`` side) is read as *before*, A as *after*: "a rejection became an acceptance"
means rejected in B, accepted in A. The rows are joined on ``sample_id`` (A's filters apply
to A; B is taken whole). Tables:

- ``judges``: who decided each side (``judged_by``: the checkpoint, or the run's own trainer)
  and its row count;
- ``transitions``: B's decision → A's decision, with ``absent`` for a candidate only one side
  has;
- ``flips``: per class, the candidates both judged, how many rejections became acceptances and
  the reverse, and the acceptance rate of the scored on each side; classes with a flip first.
"""

from __future__ import annotations

from typing import Any

from pipeline.inspection.query import DecisionQuery
from pipeline.inspection.table import FREQUENCY_NAMES, Column, Summary, Table

_COLUMNS = "sample_id, class_id, class_name, class_frequency, decision, reason, score"


def _side(q: DecisionQuery) -> Any:
    present = q.columns()
    # Shards before schema 2.1 have no judged_by: their trainer judged them.
    judged = "judged_by" if "judged_by" in present else "'' AS judged_by"
    return q.con.sql(f"SELECT {_COLUMNS}, {judged} FROM selected").to_arrow_table()


def compare(a: DecisionQuery, b: DecisionQuery) -> Summary:
    """The comparison of A's selected decisions with B's (module docstring)."""
    import duckdb

    con = duckdb.connect(config={"threads": 2, "autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    try:
        con.register("a", _side(a))
        con.register("b", _side(b))

        def rows(sql: str) -> list[dict[str, Any]]:
            cur = con.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

        judges = rows(
            "SELECT 'A' AS side, coalesce(nullif(judged_by, ''), 'the run''s trainer') AS "
            "judged_by, count(*) AS n FROM a GROUP BY 2 UNION ALL "
            "SELECT 'B', coalesce(nullif(judged_by, ''), 'the run''s trainer'), count(*) "
            "FROM b GROUP BY 2 ORDER BY 1, 2")
        transitions = rows(
            "SELECT coalesce(b.decision, 'absent') AS before, "
            "coalesce(a.decision, 'absent') AS after, count(*) AS n "
            "FROM a FULL OUTER JOIN b USING (sample_id) GROUP BY 1, 2 ORDER BY 1, 2")
        flips = rows(
            "SELECT a.class_id, any_value(a.class_name) AS class_name, "
            "any_value(a.class_frequency) AS class_frequency, count(*) AS both_judged, "
            "count(*) FILTER (WHERE b.decision = 'rejected' AND a.decision = 'accepted') "
            "  AS rejected_to_accepted, "
            "count(*) FILTER (WHERE b.decision = 'accepted' AND a.decision = 'rejected') "
            "  AS accepted_to_rejected, "
            "count(*) FILTER (WHERE a.decision = 'accepted') AS a_accepted, "
            "count(*) FILTER (WHERE a.decision <> 'invalid') AS a_scored, "
            "count(*) FILTER (WHERE b.decision = 'accepted') AS b_accepted, "
            "count(*) FILTER (WHERE b.decision <> 'invalid') AS b_scored "
            "FROM a JOIN b USING (sample_id) GROUP BY a.class_id "
            "ORDER BY rejected_to_accepted + accepted_to_rejected DESC, both_judged DESC, "
            "a.class_id")
    finally:
        con.close()
    for r in flips:
        r["group"] = FREQUENCY_NAMES.get(r["class_frequency"], r["class_frequency"])
        r["a_accept_rate"] = r["a_accepted"] / r["a_scored"] if r["a_scored"] else None
        r["b_accept_rate"] = r["b_accepted"] / r["b_scored"] if r["b_scored"] else None
    both = sum(r["both_judged"] for r in flips)
    up = sum(r["rejected_to_accepted"] for r in flips)
    down = sum(r["accepted_to_rejected"] for r in flips)
    tables = [
        Table("judges", "Who judged each side", [Column("side"), Column("judged_by"),
                                                  Column("n", "int")], judges),
        Table("transitions", "Decision before (B) -> after (A), joined on sample_id",
              [Column("before"), Column("after"), Column("n", "int")], transitions),
        Table("flips", "Flips by class, B -> A (candidates both sides judged)",
              [Column("class_id", "int"), Column("class_name"), Column("group"),
               Column("both_judged", "int"), Column("rejected_to_accepted", "int"),
               Column("accepted_to_rejected", "int"), Column("b_accept_rate", "rate"),
               Column("a_accept_rate", "rate")], flips,
              note="accept rates over the scored (accepted + rejected)", ranked=True),
    ]
    notes = [f"A (after) = {a.uri}, B (before) = {b.uri}: {both} candidates judged by both; "
             f"{up} rejections in B are acceptances in A, {down} acceptances in B are "
             "rejections in A"]
    total = sum(r["n"] for r in judges if r["side"] == "A")
    return Summary(uri=f"{a.uri} vs {b.uri}", files=len(a.files) + len(b.files),
                   total_rows=total, selected_rows=total, filters=a.filters.describe(), tables=tables, notes=notes)

"""Reading decisions back: DuckDB queries over the shards and the summary tables.

``query`` opens the shards of a run (local or s3://) as DuckDB views and applies the user's
filters; ``table`` is the table model; ``summary``, ``costs``, ``feedback`` and ``compare``
build tables (counts, acceptance by group and class, score quantiles, acceptance over steps,
precision/recall against the generator's truth; cost per accepted instance; the closed loop's
prompt options; two judgements joined); ``tables`` is the registry of the tables by name;
``render`` prints tables as text, JSON or CSV; ``commands`` holds the ``bsgal inspect`` and
``bsgal export-pool`` commands. The HTML report is :mod:`pipeline.inspection.report` (with its
charts and galleries), the instance-pool export :mod:`pipeline.inspection.export_pool`, the
end-of-run summary that ``bsgal run`` prints :mod:`pipeline.inspection.run_summary`.
"""

from __future__ import annotations

# The tables of ``bsgal inspect`` by name (kept here so the CLI can list them without loading
# DuckDB).
TABLE_NAMES = ("counts", "groups", "classes", "scores", "thresholds", "steps", "truth",
               "truth_failures", "cost", "cost_classes", "options", "rows")
#: ``generators.columns.DECISION_KINDS`` for ``--decision`` (importing that module would load
#: numpy for ``bsgal --help``); tests/test_inspect.py checks the two are equal.
DECISION_CHOICES = ("accepted", "rejected", "invalid")

"""The end-of-run summary: counts that must add up, acceptance, evaluation, where things are.

:func:`summarize_run` reads the run folder (shards through DuckDB, ``eval.json``, the workers'
last metrics records) into plain data, which the job writes as ``OUT/summary.json``;
:func:`summary_text` is what ``bsgal run``/``bsgal demo`` print.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, feedback_settings
from pipeline.storage.run_dir import RunDir, read_metrics
from pipeline.storage.shard_schema import DECISIONS, shards_root


def _worker_totals(run: RunDir, workers: int) -> list[dict[str, Any]]:
    totals = []
    for rank in range(workers):
        name = "metrics.jsonl" if rank == 0 else f"metrics-r{rank:03d}.jsonl"
        done = [r for r in read_metrics(run, name) if r.get("kind") == "worker_done"]
        if done:
            totals.append({"rank": rank, "step": done[-1]["step"], **done[-1]["totals"]})
    return totals


def _skipped_images(run: RunDir, workers: int) -> dict[str, str]:
    """``file → reason`` of every image the workers left out (``data.bad_images=skip``)."""
    found: dict[str, str] = {}
    for rank in range(workers):
        name = "metrics.jsonl" if rank == 0 else f"metrics-r{rank:03d}.jsonl"
        for record in read_metrics(run, name):
            if record.get("kind") == "skipped_images":
                found.update(record.get("files") or {})
    return dict(sorted(found.items()))


def endpoint_hint(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """The S3 endpoint a command needs to reach ``uri`` again (from ``endpoint_url`` or
    ``client_kwargs.endpoint_url``), without any user name or password in it; None for a
    local path or the default endpoint."""
    from urllib.parse import urlsplit, urlunsplit

    from pipeline.storage.filesystem import is_uri

    opts = storage_options or {}
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if not url or not is_uri(uri):
        return None
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def summarize_run(cfg: RunConfig) -> dict[str, Any]:
    """Counts by decision/reason/frequency group/generator truth, evaluation and timings of the
    finished run in ``cfg.output.dir``."""
    from pipeline.inspection.costs import cost_summary
    from pipeline.inspection.feedback import feedback_summary
    from pipeline.inspection.query import DecisionQuery
    from pipeline.inspection.summary import frequency_groups, truth_by_failure

    out, opts = cfg.output.dir.rstrip("/"), cfg.output.storage_options
    run = RunDir(out, opts)
    # The workers (other processes) wrote the shards: forget what this process listed before.
    run.fs.invalidate_cache()
    planned = cfg.generation.num_candidates
    summary: dict[str, Any] = {"run": cfg.name, "out": out, "shards": shards_root(out),
                               "candidates_planned": planned,
                               "endpoint_url": endpoint_hint(out, opts)}
    if planned:
        with DecisionQuery(out, storage_options=opts or None) as q:
            counts = dict.fromkeys(DECISIONS, 0)
            for r in q.rows("SELECT decision, count(*) AS n FROM decisions GROUP BY 1"):
                counts[r["decision"]] = int(r["n"])
            (rows, distinct) = q.con.execute(
                "SELECT count(*), count(DISTINCT sample_id) FROM decisions").fetchone()
            summary["reasons"] = {r["reason"]: int(r["n"]) for r in q.rows(
                "SELECT reason, count(*) AS n FROM decisions GROUP BY 1 ORDER BY 2 DESC")}
            summary["groups"] = frequency_groups(q).records()
            truth = truth_by_failure(q)
            summary["truth_failures"] = truth.records() if truth is not None else None
            summary["cost"] = cost_summary(q)
            summary["feedback"] = feedback_summary(q, feedback_settings(cfg).closed)
    else:
        counts, rows, distinct = {"accepted": 0, "rejected": 0, "invalid": 0}, 0, 0
        summary.update(reasons={}, groups=[], truth_failures=None, cost=None, feedback=None)
    summary["decisions"] = {**counts, "rows": int(rows), "distinct_sample_ids": int(distinct)}
    summary["counts_add_up"] = bool(rows == planned == distinct
                                    and sum(counts.values()) == planned)
    summary["eval"] = run.read_json("eval.json") if run.exists("eval.json") else None
    totals = _worker_totals(run, cfg.training.num_workers)
    summary["workers"] = totals
    summary["skipped_images"] = _skipped_images(run, cfg.training.num_workers)
    summary["random_weights"] = random_weight_stages(cfg)
    summary["final_step"] = max((t["step"] for t in totals), default=None)
    return summary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def random_weight_stages(cfg: RunConfig) -> list[str]:
    """The stages of ``cfg`` that run random weights (``*.weights: random*``), in order."""
    stages = []
    if cfg.generation.backend == "stable_diffusion" and cfg.generation.weights != "pretrained":
        stages.append("generation")
    if cfg.annotation.backend == "sam" and cfg.annotation.weights != "pretrained":
        stages.append("annotation")
    if cfg.training.weights != "pretrained":
        stages.append("training")
    return stages


def random_weights_line(stages: list[str] | None) -> str | None:
    """The warning that leads the summary (and the report) of a random-weight run."""
    if not stages:
        return None
    return (f"RANDOM WEIGHTS ({', '.join(stages)}): a throughput and memory run; its images, "
            "masks, decisions and AP mean nothing")


def summary_text(summary: dict[str, Any]) -> str:
    """A short human summary of :func:`summarize_run`'s output."""
    d = summary["decisions"]
    warning = random_weights_line(summary.get("random_weights"))
    lines = [warning] if warning else []
    lines += [
        f"run {summary['run']} finished in {summary.get('seconds', 0):.0f} s "
        f"(step {summary.get('final_step')})",
        f"candidates made: {summary['candidates_planned']}  →  accepted {d['accepted']}, "
        f"rejected {d['rejected']}, invalid {d['invalid']}  "
        f"({'counts add up' if summary['counts_add_up'] else 'COUNTS DO NOT ADD UP'})",
    ]
    if summary["groups"]:
        lines.append("acceptance by frequency group (accepted / scored, invalid):")
        for g in summary["groups"]:
            lines.append(f"  {g['group']:<9} {g['accepted']:>5} / {g['accepted'] + g['rejected']:<5}"
                         f" {_pct(g['accept_rate_scored']):>5}   invalid {g['invalid']}")
    if summary.get("truth_failures"):
        parts = [f"{t['truth_failure']} {_pct(t['accept_rate'])}"
                 for t in summary["truth_failures"]]
        lines.append("accepted by generator outcome (built-in truth): " + ", ".join(parts))
    from pipeline.inspection.costs import cost_line
    from pipeline.inspection.feedback import feedback_line

    for line in (cost_line(summary.get("cost")), feedback_line(summary.get("feedback"))):
        if line:
            lines.append(line)
    ev = summary.get("eval")
    if ev:
        for iou in ("segm", "bbox"):
            m = ev.get(iou)
            if m:
                lines.append(f"{iou:<4} AP {100 * m['AP']:.1f}  APr {100 * m['APr']:.1f}  "
                             f"APc {100 * m['APc']:.1f}  APf {100 * m['APf']:.1f}")
    skipped = summary.get("skipped_images") or {}
    if skipped:
        names = ", ".join(list(skipped)[:5]) + (f" and {len(skipped) - 5} more"
                                                 if len(skipped) > 5 else "")
        lines.append(f"skipped {len(skipped)} images that do not load (data.bad_images=skip; "
                     f"reasons in summary.json): {names}")
    lines.append(f"decision shards: {summary['shards']}")
    out = summary["out"]
    # The endpoint only: credentials are never printed.
    flags = f" --endpoint-url {summary['endpoint_url']}" if summary.get("endpoint_url") else ""
    lines.append(f"next: bsgal inspect {out}{flags}")
    lines.append(f"      bsgal inspect {out}{flags} --html {out}/report.html")
    return "\n".join(lines)

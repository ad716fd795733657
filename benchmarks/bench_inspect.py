"""Time ``bsgal inspect`` (tables, --where, --html) and ``bsgal export-pool`` on a written run.

Writes a run of ``--rows`` decisions (12 classes, long-tailed, 128 x 128 images drawn with the
built-in looks) with the real ShardWriter, then runs each command as a user would (a fresh
``python -m pipeline.cli`` process, so interpreter and import time count) and prints wall time
and output size. Usage::

    PYTHONPATH=. python benchmarks/bench_inspect.py [--rows 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.conftest import make_rows, write_run

FAILURES = ("wrong_class", "broken", "clutter", "noise")


def long_tailed_plan(rows: int, classes: int = 12, seed: int = 0) -> list:
    """Per-class decision lists: class k gets a share ~ 1/(k+1); 45 % accepted, 45 % rejected,
    10 % invalid; one candidate in three is a generator failure."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    counts = np.maximum(1, np.round(rows * weights / weights.sum()).astype(int))
    plan = []
    for k, n in enumerate(counts):
        items = []
        for _ in range(n):
            u = rng.random()
            reason = ("accepted" if u < 0.45 else "rejected_score" if u < 0.9 else
                      rng.choice(["invalid_empty_mask", "invalid_area_ratio"]))
            truth = "none" if rng.random() < 2 / 3 else str(rng.choice(FAILURES))
            items.append((str(reason), truth))
        plan.append((k + 1, f"class_{k + 1:02d}", "fcr"[k % 3], items))
    return plan


def run(args: list[str], repeats: int) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times = []
    out = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env,
                              capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"bsgal {' '.join(args)} failed: {done.stderr or done.stdout}")
        out = done.stdout
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        rows = make_rows(long_tailed_plan(a.rows), size=(128, 128))
        t0 = time.perf_counter()
        write_run(str(run_dir), rows, max_rows=256)
        write_s = time.perf_counter() - t0
        shard_bytes = sum(p.stat().st_size for p in run_dir.rglob("*.parquet"))
        report = Path(tmp) / "report.html"
        pool = Path(tmp) / "pool"
        cases = [
            ("bsgal --help", ["--help"], None),
            ("inspect (text tables)", ["inspect", str(run_dir)], None),
            ("inspect --json", ["inspect", str(run_dir), "--json"], None),
            ("inspect --where ... --rows", ["inspect", str(run_dir), "--where",
                                            "score > threshold + 0.03", "--rows"], None),
            ("inspect --html (24/class)", ["inspect", str(run_dir), "--html", str(report)],
             report),
            ("export-pool", ["export-pool", str(run_dir), str(pool), "--overwrite"], pool),
        ]
        print(f"run: {len(rows)} decisions, 12 classes, 128x128 images; shards "
              f"{shard_bytes / 1024:.0f} KiB, written in {write_s:.2f} s")
        print(f"{'command':32} {'median s':>9} {'output':>12}")
        for label, args, target in cases:
            seconds, _ = run(args, a.repeats)
            if target is None:
                size = "-"
            elif target.is_file():
                size = f"{target.stat().st_size / 1024:.0f} KiB"
            else:
                total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
                size = f"{total / 1024:.0f} KiB"
            print(f"{label:32} {seconds:9.2f} {size:>12}")


if __name__ == "__main__":
    main()

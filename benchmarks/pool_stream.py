"""Candidates/s from a large instance pool against the online built-in generator, side by side.

Run from the repository root::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/pool_stream.py [--entries 100000]
        [--candidates 2000] [--classes 1000]

What it does, every number measured in this run:

1. writes an X-Paste-layout pool of ``--entries`` small RGBA cut-outs (real instances of the
   built-in set, ~20-60 px) over ``--classes`` classes (``images/<id - 1>/<n>.png`` + JSON);
2. on one local Ray (2 CPUs), streams ``--candidates`` candidates through the real graph of
   each source, read on the driver with ``iter_batches`` as the train worker reads them:
   the online built-in stream (prompt rows → procedural generator → built-in annotator →
   checks, ``configs/demo.yaml``'s stage settings) and the pool stream (the pool's index read
   once, class-balanced draw rows → pool reader → checks, same settings);
3. prints, per source: the set-up on the driver (index read + draw rows), candidates/s once
   the first batch arrived (the actors' start-up excluded) and end to end, the share of ok
   rows, and the driver's resident memory (VmRSS, sampled every 0.1 s) before, while and
   after it streams, plus the index's own size.

Timings are wall-clock on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402


def rss_mib() -> float:
    """This process's resident memory (MiB), from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler:
    """Samples :func:`rss_mib` every ``every`` seconds in a thread; ``peak`` and ``mean``."""

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mib())
            self._stop.wait(self.every)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_pool(folder: Path, entries: int, classes: int, data_root: str) -> Path:
    """An X-Paste pool of ``entries`` cut-outs over ``classes`` classes (round robin)."""
    from benchmarks._candidate_stream import real_cutouts
    from benchmarks._pool_files import write_xpaste_pool
    from trainer.datasets import LvisDataset

    distinct = real_cutouts(LvisDataset(data_root, "train.json"), 256, seed=0)
    rows = ({"class_id": 1 + i % classes, "image": distinct[i % 256]["image"],
             "mask": distinct[i % 256]["mask"]} for i in range(entries))
    return write_xpaste_pool(folder, rows)


def stream(cfg, source, categories, n: int) -> dict:
    """Stream ``n`` candidates of ``source`` (a prompt sampler or pool draws) through the
    graph of ``cfg``, read on the driver; timings and memory."""
    from pipeline.run.graph import build_candidate_dataset, configure_data_context

    configure_data_context(cfg, 2)
    before = rss_mib()
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        rows = source.sample_batch(n)
        setup = time.perf_counter() - t0
        ds = build_candidate_dataset(cfg, rows, categories)
        t1 = time.perf_counter()
        first, seen, ok = None, 0, 0
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            if first is None:
                first, first_rows = time.perf_counter(), len(batch["sample_id"])
            seen += len(batch["sample_id"])
            ok += int((batch["status"] == "ok").sum())
        end = time.perf_counter()
    return {"setup_s": setup, "rows": seen, "ok": ok, "total_s": end - t1,
            "steady_per_s": (seen - first_rows) / max(end - first, 1e-9),
            "end_to_end_per_s": seen / (end - t1), "rss_before": before,
            "rss_peak": max(mem.samples), "rss_mean": float(np.mean(mem.samples)),
            "rss_after": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--work", default=None, help="folder for the data and the pool")
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.run.datasets import ensure_builtin_data, train_categories
    from pipeline.run.job import prompt_sampler
    from pipeline.run.pool_source import pool_draws
    from pipeline.cluster.connect import start_local_ray
    from pipeline.storage.pool_index import read_pool

    work = Path(args.work or tempfile.mkdtemp(prefix="bsgal-pool-stream-"))
    online = load_config("configs/demo.yaml", [f"data.root={work / 'data'}",
                                               f"generation.num_candidates={args.candidates}"])
    ensure_builtin_data(online.data)
    categories = train_categories(online.data)
    json_path = work / "pool" / "xpaste_pool.json"
    if not json_path.exists():
        t = time.perf_counter()
        json_path = write_pool(work / "pool", args.entries, args.classes, online.data.root)
        print(f"wrote the pool: {args.entries} entries over {args.classes} classes in "
              f"{time.perf_counter() - t:.0f} s ({json_path}, "
              f"{json_path.stat().st_size / 2**20:.1f} MiB of JSON)")
    pool_cfg = load_config("configs/demo.yaml", [
        f"data.root={work / 'data'}", "generation.backend=pool", f"generation.pool={json_path}",
        "selection.quality_gates={}", f"generation.num_candidates={args.candidates}"])
    # The pool's own vocabulary: LVIS-sized, ids 1..classes.
    pool_categories = [{"id": i, "name": f"class_{i}"} for i in range(1, args.classes + 1)]

    start_local_ray(num_cpus=2)
    try:
        results = {}
        rss0 = rss_mib()
        results["online (procedural)"] = stream(online, prompt_sampler(online, categories),
                                                categories, args.candidates)
        t = time.perf_counter()
        before_index = rss_mib()
        index = read_pool(str(json_path))
        index_s, index_rss = time.perf_counter() - t, rss_mib() - before_index
        del index
        t = time.perf_counter()
        draws = pool_draws(pool_cfg, pool_categories)
        draws_s = time.perf_counter() - t
        results[f"pool ({len(draws.index)} entries)"] = stream(pool_cfg, draws, categories,
                                                               args.candidates)
    finally:
        ray.shutdown()

    print(f"\ndriver RSS after Ray start: {rss0:.0f} MiB; pool index: read in {index_s:.2f} s, "
          f"{draws.index.nbytes / 2**20:.1f} MiB of arrays (+{index_rss:.0f} MiB RSS while "
          f"read); PoolDraws built in {draws_s:.2f} s")
    head = (f"{'source':<26} {'candidates':>10} {'ok':>6} {'setup s':>8} {'cand/s':>8} "
            f"{'cand/s e2e':>10} {'RSS before':>10} {'peak':>6} {'mean':>6} {'after':>6}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<26} {r['rows']:>10} {r['ok'] / r['rows']:>6.0%} {r['setup_s']:>8.2f} "
              f"{r['steady_per_s']:>8.1f} {r['end_to_end_per_s']:>10.1f} "
              f"{r['rss_before']:>10.0f} {r['rss_peak']:>6.0f} {r['rss_mean']:>6.0f} "
              f"{r['rss_after']:>6.0f}")
    print("(cand/s: after the first batch arrived; e2e: from building the dataset; RSS in MiB "
          "of the driver process, sampled every 0.1 s while it streams)")


if __name__ == "__main__":
    main()

"""Fault injection: short demo-sized runs, each hit by one fault at a random point, resumed
where needed, and checked against an uninterrupted run with the same seeds.

Faults (cycled in this order, each at a random number of decided candidates):

* ``driver_sigkill``: the driver process gets SIGKILL, then everything of its session (its
  local Ray) is killed, as when the machine dies; resumed with ``bsgal run --resume``.
* ``driver_sigint``: Ctrl-C (SIGINT to the driver): it must stop the stream, write a
  checkpoint and its pending rows and exit 130; resumed.
* ``stage_actor_killed``: a Ray Data stage actor (generation, annotation or checks) gets
  SIGKILL as soon as one is alive (the stages make the 48 candidates within seconds); Ray Data
  restarts it and retries its batch, the run finishes by itself.
* ``train_worker_killed``: the Ray Train worker, which holds the shard writer, gets SIGKILL
  (with tiny shards, often while a part file is being written): the run must fail with a
  clear error, not hang; resumed.
* ``s3_outage``: the run writes to a moto S3 server on 127.0.0.1, which is stopped (SIGSTOP)
  for some seconds and continued; resumed if the run failed.

Node faults (``--kinds stage_node_lost control_actors_lost train_node_lost head_lost``; see
benchmarks/_node_faults.py) run on a real 3-node Ray cluster started on this machine, against
an uninterrupted run on that cluster.

After each: candidates made = accepted + rejected + invalid, no duplicate ``sample_id``, every
visible Parquet file reads whole and nothing but ``part-*.parquet`` is visible, and the
decisions (reason, accepted, score, threshold, step, stream offset) equal the uninterrupted
run's, row for row. Prints ``faults survived: X / N, rows lost: L, duplicates: D``.

    PYTHONPATH=. python benchmarks/faults.py                 # 20 faults, ~25 min on 2 cores
    PYTHONPATH=. python benchmarks/faults.py --faults 2 --kinds driver_sigint
    PYTHONPATH=. python benchmarks/faults.py --faults 12 --kinds stage_node_lost \
        control_actors_lost train_node_lost head_lost --out-name node_faults

Writes ``benchmarks/results/faults.{md,json}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._node_faults import NODE_KINDS, NodeFaults, run_node_fault  # noqa: E402
from benchmarks._ray_cluster import cmdline  # noqa: E402

PROCESS_KINDS = ("driver_sigkill", "driver_sigint", "stage_actor_killed",
                 "train_worker_killed", "s3_outage")
KINDS = PROCESS_KINDS + NODE_KINDS
CANDIDATES = 48
COMPARED = ["reason", "accepted", "score", "threshold", "step", "stream_offset"]
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}


def run_overrides(data: Path, out: str, endpoint: str | None = None) -> list[str]:
    """A demo-shaped run of ~30 s on 2 idle cores; tiny shards so that writes are frequent."""
    keys: dict[str, Any] = {
        "data.root": data, "data.max_val_images": 6,
        "generation.num_candidates": CANDIDATES, "generation.batch_size": 8,
        "annotation.batch_size": 8, "annotation.check_batch_size": 8,
        "training.steps": 16, "training.warmup_real_steps": 2, "training.warmup_steps": 2,
        "training.checkpoint_every": 4, "training.candidate_batch_size": 8,
        "output.shard_max_rows": 4, "output.shard_flush_seconds": 1, "output.dir": out}
    if endpoint:
        keys["output.storage_options"] = json.dumps({"endpoint_url": endpoint})
    return [f"{k}={v}" for k, v in keys.items()]


# ----------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return {**os.environ, **MOTO_KEYS, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": str(REPO_ROOT)}


def start_bsgal(args: list[str], log: Path) -> subprocess.Popen:
    """``bsgal ARGS`` in a session of its own (so that its local Ray can be killed with it)."""
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=_env(),
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session (the driver and the Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    sid = proc.pid
    for pid in _pids():
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def session_processes(proc: subprocess.Popen, needle: str) -> list[int]:
    """Processes of ``proc``'s session whose command line holds ``needle`` (Ray names its
    worker processes ``ray::ClassName...``)."""
    found = []
    for pid in _pids():
        try:
            if os.getsid(pid) == proc.pid and needle in cmdline(pid):
                found.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# -------------------------------------------------------------------------------- storage


def decided_rows(out: str, storage_options: dict | None) -> int:
    """Rows visible in the shards now (from the part files' names: no Parquet read)."""
    from pipeline.storage.shard_schema import PART_NAME, shards_root
    from pipeline.storage.shards import list_shard_files

    try:
        files = list_shard_files(shards_root(out), storage_options)
    except Exception:  # the store is unreachable for a moment
        return 0
    spans = set()
    for path in files:
        m = PART_NAME.match(path.rsplit("/", 1)[-1])
        if m:  # one flush writes the same name under each decision it holds
            spans.add((int(m["start"]), int(m["end"])))
    return sum(end - start + 1 for start, end in spans)


def visible_files_problems(out: str, storage_options: dict | None) -> list[str]:
    """Files a reader could see that are not whole ``part-*.parquet`` files."""
    import pyarrow.parquet as pq

    from pipeline.storage.filesystem import filesystem
    from pipeline.storage.shard_schema import PART_NAME, shards_root

    fs, root = filesystem(shards_root(out), storage_options)
    fs.invalidate_cache()
    problems = []
    for path in fs.find(root):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".parquet"):
            continue  # never globbed by a reader (e.g. a _tmp-*.inprogress left by a kill)
        if not PART_NAME.match(name):
            problems.append(f"unexpected file {path}")
            continue
        try:
            with fs.open(path, "rb") as fh:
                pq.read_table(fh)
        except Exception as exc:
            problems.append(f"{path} does not read ({type(exc).__name__})")
    return problems


def decisions(out: str, storage_options: dict | None) -> Any:
    from pipeline.storage.shards import read_decisions

    # read_decisions lists through list_shard_files, which lists afresh.
    return read_decisions(out, columns=["sample_id", *COMPARED],
                          storage_options=storage_options).to_pandas()


# ----------------------------------------------------------------------------------- moto


class Moto:
    """moto's standalone S3 server on 127.0.0.1, which an outage stops and continues."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start; see {log}") from None
                time.sleep(0.2)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(**self.storage_options).mkdir(name)
        return f"s3://{name}"

    def outage(self, seconds: float) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -------------------------------------------------------------------------------- a fault


@dataclass
class FaultResult:
    index: int
    kind: str
    at_rows: int
    injected: bool = False
    first_exit: int | None = None
    resumes: int = 0
    rows: int = 0
    distinct: int = 0
    lost: int = 0
    duplicates: int = 0
    differing: int = 0
    counts_add_up: bool = False
    file_problems: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    recovery_s: float | None = None  # node faults: from the loss until rows grew again

    @property
    def survived(self) -> bool:
        return (self.injected and self.lost == 0 and self.duplicates == 0
                and self.differing == 0 and self.counts_add_up and not self.file_problems
                and not self.error)


def compare(reference: Any, got: Any) -> int:
    """Rows whose compared columns differ from the reference (by sample_id)."""
    a = reference.set_index("sample_id")
    b = got.drop_duplicates("sample_id").set_index("sample_id")
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    differ = None
    for column in COMPARED:
        x, y = a[column], b[column]
        bad = ~((x == y) | (x.isna() & y.isna()))
        differ = bad if differ is None else differ | bad
    return int(differ.sum()) if differ is not None else 0


def inject(kind: str, proc: subprocess.Popen, moto: Moto | None, rng: random.Random) -> bool:
    """Inflict the fault on the running ``proc``; whether there was something to hit."""
    if kind == "driver_sigkill":
        os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        kill_session(proc)
        return True
    if kind == "driver_sigint":
        proc.send_signal(signal.SIGINT)
        return True
    if kind == "stage_actor_killed":
        pids = session_processes(proc, "MapWorker")
        if not pids:
            return False
        os.kill(rng.choice(pids), signal.SIGKILL)
        return True
    if kind == "train_worker_killed":
        pids = session_processes(proc, "RayTrainWorker")
        if not pids:
            return False
        os.kill(pids[0], signal.SIGKILL)
        return True
    if kind == "s3_outage":
        assert moto is not None
        moto.outage(rng.uniform(3.0, 8.0))
        return True
    raise ValueError(f"unknown fault {kind!r}; use one of {KINDS}")


def check_decisions(result: FaultResult, out: str, opts: dict | None, reference: Any) -> None:
    """Fill ``result``'s row checks from the run in ``out``."""
    got = decisions(out, opts)
    result.rows = len(got)
    result.distinct = int(got["sample_id"].nunique())
    result.duplicates = result.rows - result.distinct
    result.lost = len(set(reference["sample_id"]) - set(got["sample_id"]))
    result.differing = compare(reference, got)
    result.counts_add_up = result.distinct == result.rows == CANDIDATES
    result.file_problems = visible_files_problems(out, opts)


def run_fault(index: int, kind: str, data: Path, work: Path, moto: Moto | None,
              reference: Any, rng: random.Random, timeout: float,
              nodes: NodeFaults | None = None) -> FaultResult:
    started = time.monotonic()
    at_rows = rng.randint(8, CANDIDATES - 12)
    result = FaultResult(index=index, kind=kind, at_rows=at_rows)
    log = work / f"fault-{index:02d}-{kind}.log"
    if kind in NODE_KINDS:
        assert nodes is not None
        out = str(work / f"fault-{index:02d}")
        try:
            found = run_node_fault(nodes, index, kind, str(REPO_ROOT / "configs" / "demo.yaml"),
                                   run_overrides(data, out), out, log, timeout, at_rows,
                                   start_bsgal, decided_rows, wait_exit, kill_session)
            for key, value in found.items():
                setattr(result, key, value)
            check_decisions(result, out, None, reference)
        except Exception as exc:  # a broken check is a failed fault, with its reason
            result.error = result.error or f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result
    if kind == "s3_outage":
        assert moto is not None
        out, opts, endpoint = f"{moto.bucket(f'fault-{index:02d}')}/run", moto.storage_options, \
            moto.endpoint
    else:
        out, opts, endpoint = str(work / f"fault-{index:02d}"), None, None
    proc = start_bsgal(["run", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
                        "--progress", "off", *run_overrides(data, out, endpoint)], log)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            # The stages make 48 candidates in about a second and their actors then go away:
            # a stage actor is hit as soon as one is alive, the rest at a number of rows.
            due = (session_processes(proc, "MapWorker") if kind == "stage_actor_killed"
                   else decided_rows(out, opts) >= at_rows)
            if due:
                result.injected = inject(kind, proc, moto, rng)
                break
            time.sleep(0.05 if kind == "stage_actor_killed" else 0.2)
        result.first_exit = wait_exit(proc, timeout)
        if not result.injected:
            result.error = "the fault was never injected (the run ended first)"
        if result.first_exit is None:
            result.error = f"the run did not end within {timeout:.0f} s after the fault (hang)"
            return result
        if kind == "driver_sigint" and result.first_exit != 130:
            result.error = f"Ctrl-C exited with {result.first_exit}, not 130"
        kill_session(proc)  # whatever of its Ray is left
        resume_args = ["run", "--resume", out, "--progress", "off"]
        if endpoint:
            resume_args += ["--endpoint-url", endpoint]
        code = result.first_exit
        while code != 0 and result.resumes < 2:
            result.resumes += 1
            proc = start_bsgal(resume_args, log)
            code = wait_exit(proc, timeout)
            kill_session(proc)
            if code is None:
                result.error = f"resume {result.resumes} did not end within {timeout:.0f} s"
                return result
        if code != 0:
            result.error = f"the run did not finish after {result.resumes} resumes (exit {code})"
        check_decisions(result, out, opts, reference)
    except Exception as exc:  # a broken check is a failed fault, with its reason
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.poll() is None:
            kill_session(proc)
        result.seconds = time.monotonic() - started
    return result


# ----------------------------------------------------------------------------------- main


def reference_run(data: Path, work: Path, timeout: float, nodes: NodeFaults | None = None
                  ) -> Any:
    """The uninterrupted run (on the cluster of ``nodes`` when given)."""
    from benchmarks._node_faults import pins

    out = str(work / ("reference-cluster" if nodes else "reference"))
    extra = pins(nodes.ensure().address) if nodes else []
    proc = start_bsgal(["run", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
                        "--progress", "off", *run_overrides(data, out), *extra],
                       work / "reference.log")
    code = wait_exit(proc, timeout)
    kill_session(proc)
    if code != 0:
        raise SystemExit(f"the uninterrupted reference run failed (exit {code}); see "
                         f"{work / 'reference.log'}")
    return decisions(out, None)


def summary_line(results: list[FaultResult]) -> str:
    survived = sum(r.survived for r in results)
    lost = sum(r.lost for r in results)
    duplicates = sum(r.duplicates for r in results)
    return f"faults survived: {survived} / {len(results)}, rows lost: {lost}, " \
           f"duplicates: {duplicates}"


def markdown(results: list[FaultResult], wall: float) -> str:
    lines = ["# Fault injection", "", f"`PYTHONPATH=. python benchmarks/faults.py` — "
             f"{len(results)} faults, wall time {wall / 60:.1f} min, {os.cpu_count()} cores.", "",
             f"**{summary_line(results)}**", "",
             "| # | fault | at rows | first exit | resumes | rows | lost | dup | differing | "
             "files | survived | loss to progress s | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.0f}"
        lines.append(f"| {r.index} | {r.kind} | {r.at_rows} | {r.first_exit} | {r.resumes} | "
                     f"{r.rows} | {r.lost} | {r.duplicates} | {r.differing} | "
                     f"{len(r.file_problems)} | {'yes' if r.survived else 'NO: ' + r.error} | "
                     f"{recovery} | {r.seconds:.0f} |")
    lines += ["", "| fault | survived | manual resumes | median loss to progress s |",
              "|---|---|---|---|"]
    for kind in dict.fromkeys(r.kind for r in results):
        mine = [r for r in results if r.kind == kind]
        times = sorted(r.recovery_s for r in mine if r.recovery_s is not None)
        median = f"{times[len(times) // 2]:.0f}" if times else "-"
        lines.append(f"| {kind} | {sum(r.survived for r in mine)} / {len(mine)} | "
                     f"{sum(r.resumes for r in mine)} | {median} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[FaultResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(PROCESS_KINDS),
                        help="fault kinds, cycled (default: the process kinds; node kinds "
                             "run on a 3-node cluster started here)")
    parser.add_argument("--out-name", default="faults",
                        help="results file stem (default faults: "
                             "benchmarks/results/faults.md and .json)")
    parser.add_argument("--seed", type=int, default=0, help="where each fault strikes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--work-dir", help="keep runs and logs here (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"),
                        help="where faults.{md,json} go ('-': nowhere)")
    args = parser.parse_args(argv)
    from trainer.datasets.builtin import write_builtin_dataset

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bsgal-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data = work / "data"
    if not (data / "train.json").exists():
        write_builtin_dataset(data, seed=0, num_train_images=240, num_val_images=60)
    moto = Moto(work / "moto.log") if "s3_outage" in args.kinds else None
    nodes: NodeFaults | None = None
    os.environ.update(MOTO_KEYS)
    rng = random.Random(args.seed)
    results: list[FaultResult] = []
    try:
        reference = cluster_reference = None
        if set(args.kinds) & set(PROCESS_KINDS):
            reference = reference_run(data, work, args.timeout)
            print(f"reference run: {len(reference)} decisions", flush=True)
        if set(args.kinds) & set(NODE_KINDS):
            nodes = NodeFaults(work)
            cluster_reference = reference_run(data, work, args.timeout, nodes)
            print(f"reference run on the cluster: {len(cluster_reference)} decisions",
                  flush=True)
        for i in range(args.faults):
            kind = args.kinds[i % len(args.kinds)]
            r = run_fault(i, kind, data, work, moto,
                          cluster_reference if kind in NODE_KINDS else reference, rng,
                          args.timeout, nodes)
            results.append(r)
            state = "survived" if r.survived else f"FAILED ({r.error or 'checks'})"
            print(f"[{i + 1}/{args.faults}] {kind} at {r.at_rows} rows: first exit "
                  f"{r.first_exit}, {r.resumes} resumes, {r.rows} rows, lost {r.lost}, "
                  f"duplicates {r.duplicates}, differing {r.differing}: {state} "
                  f"({r.seconds:.0f} s)", flush=True)
    finally:
        if moto is not None:
            moto.close()
        if nodes is not None:
            nodes.close()
    wall = time.monotonic() - started
    print(summary_line(results))
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.out_name}.md").write_text(markdown(results, wall))
        (out / f"{args.out_name}.json").write_text(json.dumps(
            {"wall_s": wall, "summary": summary_line(results),
             "results": [{**asdict(r), "survived": r.survived} for r in results]}, indent=2))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()

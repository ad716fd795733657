"""The short version of benchmarks/faults.py: real `bsgal run` processes on their own local
Ray, a driver killed with SIGKILL (and its Ray with it) mid-run, resumed and checked against an
uninterrupted run with the same seeds. (A stage actor killed mid-run is tested in
tests/test_pipeline_ray.py, the other kinds by the benchmark itself.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from benchmarks import faults  # noqa: E402


def test_injected_faults_lose_no_row_and_change_no_decision(tmp_path: Path, capsys) -> None:
    results = faults.main(["--faults", "1", "--kinds", "driver_sigkill",
                           "--seed", "3", "--work-dir", str(tmp_path), "--out", "-"])
    printed = capsys.readouterr().out
    assert "faults survived: 1 / 1, rows lost: 0, duplicates: 0" in printed, printed
    by_kind = {r.kind: r for r in results}
    assert by_kind["driver_sigkill"].resumes >= 1  # the killed driver had to be resumed
    for r in results:
        assert r.injected and r.rows == faults.CANDIDATES and r.differing == 0

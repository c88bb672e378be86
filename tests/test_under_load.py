"""The timing- and kill-sensitive tests (marker `timing`) pass beside a process spinning on one core.

CI runs on whichever machine of the project's kind it gets: slow, fast, or shared with other work. A test that
times, kills or races must assert what such a machine cannot change (paired rounds, the stability verdicts,
kill points the runner defines), and this test holds them to it: it runs them again, in a fresh pytest, while
one core of the two is taken by a competitor for the whole run. A test that fails here asserts a measurement,
and belongs in a benchmark (benchmarks/, `capsbench bench`, scripts/same_commit_pairs.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_timing_and_kill_sensitive_tests_pass_beside_a_spinning_core(tmp_path):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run(
            [
                *[sys.executable, "-m", "pytest", "-m", "timing", "-p", "no:cacheprovider", "-q"],
                *["--durations=10", "--basetemp", str(tmp_path / "inner"), "tests"],
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert spinner.poll() is None, "the competitor stopped before the tests did"
    finally:
        spinner.kill()
        spinner.wait()
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    print(tail)  # the inner run's durations and summary, in this run's log
    assert done.returncode == 0, tail
    assert " passed" in done.stdout.splitlines()[-1], tail

"""The time stage's rounds beside other work (issue 14): rounds timed while other processes took the cores are
set aside and replaced within a bound, the machine probe records how fast the machine ran, and a whole timing
beside a competing process is marked unstable and never becomes a finding of `capsbench check`."""

import json
import shutil
import subprocess
import sys
import time

from capsbench.export.latency import MAX_OTHER_CORES
from capsbench.export.sessions import default_threads
from capsbench.reports.compare import compare_runs
from capsbench.suite.cli import main
from capsbench.suite.stages.time import MAX_PROBE_DRIFT, clean_rounds, machine_probe


def _scripted_rounds(contentions):
    """one_round for `clean_rounds`: the n-th call returns a round with the n-th contention (None: clean)."""
    calls = []

    def one_round(n, clean):
        calls.append((n, clean))
        return {"n": n, "contention": contentions[n - 1]}

    return one_round, calls


def test_a_contended_round_is_set_aside_and_another_timed():
    one_round, calls = _scripted_rounds([None, "other processes used 0.90 cores", None, None])
    rounds, set_aside = clean_rounds(one_round, wanted=3)
    assert [r["n"] for r in rounds] == [1, 3, 4]
    assert set_aside == ["other processes used 0.90 cores"]
    assert calls == [(1, 0), (2, 1), (3, 1), (4, 2)]


def test_rounds_are_bounded_and_contended_ones_are_kept_when_too_few_are_clean():
    busy = "other processes used 1.00 cores"
    one_round, calls = _scripted_rounds([None, busy, None, busy, busy, None])
    rounds, set_aside = clean_rounds(one_round, wanted=3, extra=2)
    assert len(calls) == 5  # 3 wanted + 2 extra, never the 6th
    assert [r["n"] for r in rounds] == [1, 3, 2, 4, 5] and set_aside == []  # all pooled: nothing hidden


def test_no_extra_rounds_when_most_rounds_were_contended():
    busy = "other processes used 1.00 cores"
    one_round, calls = _scripted_rounds([busy, None, busy, None, None])
    rounds, set_aside = clean_rounds(one_round, wanted=3, extra=2)
    assert len(calls) == 3  # the other work did not pass: waiting for it would not help
    assert [r["n"] for r in rounds] == [2, 1, 3] and set_aside == []


def _probe(min_ms):
    return {"n": 2048, "device": "cpu", "threads": 2, "p50_ms": min_ms * 1.02, "min_ms": min_ms,
            "stable": True, "samples_ms": [min_ms * 1.02] * 5}  # fmt: skip


def test_machine_probe_drift_is_judged_between_rounds_on_their_fastest_probe_calls():
    # one slow probe (98 ms) in the second round: that round's fastest probe call is 92 ms
    rounds = [{"probes": [_probe(90.0), _probe(91.0)]}, {"probes": [_probe(92.0), _probe(98.0)]}]
    probe = machine_probe(rounds)
    assert probe["drift"] == 92.0 / 90.0 and probe["min_ms"] == 91.5
    assert probe["round_min_ms"] == [[90.0, 91.0], [92.0, 98.0]] and len(probe["round_samples_ms"][0]) == 10
    assert probe["gflops_per_s"] == 2 * 2048**3 / (probe["p50_ms"] / 1e3) / 1e9
    slower = machine_probe(
        [{"probes": [_probe(90.0), _probe(91.0)]}, {"probes": [_probe(110.0), _probe(112.0)]}]
    )
    assert probe["drift"] < MAX_PROBE_DRIFT < slower["drift"]


def test_timing_beside_a_busy_cpu_is_unstable_and_check_does_not_call_it_a_regression(
    smoke_all_run, tmp_path
):
    quiet = smoke_all_run
    busy = tmp_path / "smoke"
    shutil.copytree(quiet, busy)
    competitors = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(default_threads())
    ]
    try:
        time.sleep(0.3)
        args = ["--batch-sizes", "1", "8", "--iters", "10", "--rounds", "2"]
        assert main(["time", "--force", "--runs-dir", str(tmp_path), "--run-id", "smoke", *args]) == 0
    finally:
        for p in competitors:
            p.kill()
            p.wait()
    for cfg in json.loads((busy / "run.json").read_text())["configs"]:
        lat = json.loads((busy / cfg["config_id"] / "latency.json").read_text())
        assert lat["rounds"] == 2 and lat["rounds_set_aside"] == []  # both contended: no extra rounds
        rows = [r for r in lat["rows"] if r["status"] == "ok"]
        assert rows and not any(r["stable"] for r in rows)
        # the competitor was seen (about one core's worth) in every row's rounds, whatever else made it unstable
        for r in rows:
            assert max(x for x in r["round_other_cores"] if x is not None) > MAX_OTHER_CORES, r
    for cur, base in ((busy, quiet), (quiet, busy)):
        result = compare_runs(cur, base)
        assert result["regressions"] == []
        statuses = {ch["status"] for ch in result["checks"] if "noise" in ch}
        assert statuses and statuses <= {"unstable", "disturbed"}

"""The time stage's rounds beside other work (issue 14): rounds timed while other processes took the cores are
set aside and replaced within a bound, the machine probe records how fast the machine ran, and a whole timing
beside a competing process is marked unstable and never becomes a finding of `capsbench check`."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from capsbench.export.latency import MAX_OTHER_CORES
from capsbench.export.sessions import default_threads
from capsbench.export.timing import MAX_PROBE_DRIFT, clean_rounds, machine_probe, rounds_agree
from capsbench.reports.compare import compare_runs
from capsbench.suite.cli import main


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


# ------------------------------------------------------------------ --min-rounds: stop when the rounds agree


def _agreeing_round(p50s, stable=True, contention=None):
    """One round's rows at batch 1: ORT and eager with their p50s, ORT's speedup as the sweep adds it."""
    ort, eager = p50s
    rows = [
        {"variant": "model", "backend": "ort_cpu", "batch": 1, "status": "ok", "p50_ms": ort, "stable": stable,
         "speedup_vs_torch_eager": eager / ort},
        {"variant": "model", "backend": "torch_eager", "batch": 1, "status": "ok", "p50_ms": eager, "stable": True},
    ]  # fmt: skip
    return {"rows": rows, "contention": contention}


def test_rounds_agree_on_the_gated_speedup_when_every_measurement_is_stable():
    assert rounds_agree([_agreeing_round((1.0, 3.0)), _agreeing_round((1.09, 3.1))])
    # a whole process 40 % slower moves both runtimes: the speedup, what check gates, agrees
    assert rounds_agree([_agreeing_round((1.0, 3.0)), _agreeing_round((1.4, 4.2))])
    assert not rounds_agree([_agreeing_round((1.0, 3.0)), _agreeing_round((1.2, 3.0))])  # ORT moved alone
    assert not rounds_agree([_agreeing_round((1.0, 3.0)), _agreeing_round((1.0, 3.0), stable=False)])
    failed = _agreeing_round((1.0, 3.0))
    failed["rows"][1] = {"variant": "model", "backend": "torch_eager", "batch": 1, "status": "error"}
    assert not rounds_agree([_agreeing_round((1.0, 3.0)), failed])

    # rows timed without eager beside them (the C++ runner's): their p50 must agree
    def cpp(ms):
        return {
            "rows": [{"backend": "ort_cpp_cpu", "batch": 1, "status": "ok", "p50_ms": ms, "stable": True}]
        }  # noqa: E731

    assert rounds_agree([cpp(1.0), cpp(1.05)]) and not rounds_agree([cpp(1.0), cpp(1.3)])


def test_min_rounds_stops_at_two_clean_rounds_that_agree_and_goes_on_when_they_do_not():
    def scripted(rounds):
        calls = []

        def one_round(n, clean):
            calls.append(n)
            return rounds[n - 1]

        return one_round, calls

    def enough(clean):
        return len(clean) >= 2 and rounds_agree(clean)

    one_round, calls = scripted([_agreeing_round((1.0, 3.0)), _agreeing_round((1.05, 3.1))])
    rounds, _ = clean_rounds(one_round, wanted=3, enough=enough)
    assert calls == [1, 2] and len(rounds) == 2
    # the second disagrees: the third round runs, and the run has its full rounds
    one_round, calls = scripted(
        [_agreeing_round((1.0, 3.0)), _agreeing_round((1.5, 3.0)), _agreeing_round((1.0, 3.0))]
    )
    rounds, _ = clean_rounds(one_round, wanted=3, enough=enough)
    assert calls == [1, 2, 3] and len(rounds) == 3
    # a contended round never counts towards agreement: it is set aside and another clean one is timed
    busy = _agreeing_round((1.0, 3.0), contention="other processes used 1.00 cores")
    one_round, calls = scripted([_agreeing_round((1.0, 3.0)), busy, _agreeing_round((1.0, 3.0))])
    rounds, set_aside = clean_rounds(one_round, wanted=3, enough=enough)
    assert calls == [1, 2, 3] and len(rounds) == 2 and set_aside == [busy["contention"]]


def test_the_smoke_preset_stops_timing_at_two_agreeing_rounds_and_the_others_time_every_round():
    from capsbench.suite.cli import build_parser
    from capsbench.suite.cli.options import time_settings

    parser = build_parser()
    smoke = time_settings(parser.parse_args(["time", "--preset", "smoke"]))
    assert smoke.min_rounds == 2 and smoke.rounds == 3
    for name in ("depth", "quick", "paper"):
        assert time_settings(parser.parse_args(["time", "--preset", name])).min_rounds is None
    depth = time_settings(parser.parse_args(["all", "--preset", "depth"]))
    assert depth.batch_sizes == (1, 32)  # the preset's batch sizes, for `time` as for `all`
    given = time_settings(
        parser.parse_args(["all", "--preset", "smoke", "--min-rounds", "3", "--batch-sizes", "4"])
    )
    assert given.min_rounds == 3 and given.batch_sizes == (4,)


def test_the_ort_delay_test_hook_is_a_setting_and_part_of_the_cache_key(tmp_path):
    """A latency timed without the hook is not reused for a run asked to add it, nor the other way round; at 0 the
    settings read as before the hook existed, so finished results stay finished."""
    from capsbench.results import write_json
    from capsbench.suite.timing import TimeSettings, finished_latency

    plain, slowed = TimeSettings(), TimeSettings(ort_delay_ms=3.0)
    assert "ort_delay_ms" not in plain.to_dict() and slowed.to_dict()["ort_delay_ms"] == 3.0
    shas = {"model": "0" * 64}
    for timed, asked in ((plain, slowed), (slowed, plain)):
        path = write_json(tmp_path / "latency.json", "latency", {
            "status": "complete", "settings": timed.to_dict(), "onnx_sha256": shas, "rows": [],
        })  # fmt: skip
        assert finished_latency(path, timed, shas) is not None
        assert finished_latency(path, asked, shas) is None


@pytest.mark.slow
def test_a_round_probes_the_machine_holds_torch_to_ieee_fp32_and_restores_its_threads():
    import torch

    from capsbench.export.timing import timed_round

    seen = {}

    def sweep():
        seen["threads"] = torch.get_num_threads()
        seen["tf32"] = torch.backends.cuda.matmul.fp32_precision
        rows = [{"backend": "ort_cpu", "batch": 1, "status": "ok", "stable": True, "p50_ms": 1.0,
                 "other_cores": 1.5, "contention_window_s": 1.0}]  # fmt: skip
        return rows, {"session": "s"}

    before = torch.get_num_threads()
    r = timed_round(sweep, threads=1)
    assert seen == {"threads": 1, "tf32": "ieee"} and torch.get_num_threads() == before
    assert len(r["probes"]) == 2 and r["gemm"]["cpu"] is r["probes"][0] and r["session"] == "s"
    assert r["precision"]["torch_tf32"] is False
    # the other processes' 1.5 cores while it ran: the round is set aside and its rows unstable, with the reason
    assert r["contention"] is not None and "1.50 cores" in r["contention"]
    assert r["rows"][0]["stable"] is False and r["rows"][0]["unstable_reason"] == r["contention"]


def test_the_cpp_stage_times_in_the_python_stages_rounds(smoke_all_run):
    """latency_cpp.json comes from the same rounds as latency.json: a machine probe at each round's start and
    end, the precision policy, and every row pooled from the runner's raw samples of each round."""
    for folder in sorted(p for p in smoke_all_run.iterdir() if (p / "latency_cpp.json").is_file()):
        cpp = json.loads((folder / "latency_cpp.json").read_text())
        py = json.loads((folder / "latency.json").read_text())
        assert set(cpp["settings"]) == set(py["settings"]) and cpp["precision"] == py["precision"]
        assert len(cpp["machine_probe"]["round_p50_ms"]) == cpp["rounds"] >= 2
        assert all(len(p) == 2 for p in cpp["machine_probe"]["round_p50_ms"])  # start and end of each round
        for row in cpp["rows"]:
            assert row["status"] == "ok" and row["backend"] == "ort_cpp_cpu"
            assert len(row["round_samples_ms"]) == cpp["rounds"] == row["rounds"]
            every = [x for r in row["round_samples_ms"] for x in r]
            assert row["p50_ms"] == pytest.approx(float(np.median(every)))  # Python's summariser, all rounds

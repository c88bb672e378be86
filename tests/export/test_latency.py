"""The timing harness: statistics on a known sequence of durations, sync inside the timed region, a sweep
that records a failing backend and goes on, real ORT and torch side by side."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from capsbench.export import make_session, summarize, sweep, time_backend
from capsbench.export.latency import (
    MAX_OTHER_CORES,
    Contention,
    format_table,
    ort_backend,
    pool_rounds,
    runtime_environment,
    stability,
    take_batch,
    torch_backend,
)
from capsbench.export.sessions import default_threads
from capsbench.reports.compare import Tolerances, compare_runs


class FakeClock:
    """A clock that only moves when the timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def scripted(clock, durations):
    it = iter(durations)
    return lambda: clock.advance(next(it))


def test_statistics_of_a_known_sequence_of_durations():
    clock = FakeClock()
    first, warm = 0.5, [0.1, 0.1]
    timed = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = time_backend(
        scripted(clock, [first, *warm, *timed]), warmup=3, iters=100, batch=8, retries=0, clock=clock
    )
    assert stats["iters"] == stats["n"] == 100 and stats["attempts"] == 1
    assert stats["first_run_ms"] == pytest.approx(500)
    assert stats["min_ms"] == pytest.approx(1) and stats["max_ms"] == pytest.approx(100)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert stats["throughput_ips"] == pytest.approx(8 / 0.0505)
    assert stats["iqr_ms"] == pytest.approx(49.5) and stats["iqr_rel"] == pytest.approx(49.5 / 50.5)
    assert stats["cv"] == pytest.approx(stats["std_ms"] / 50.5)
    assert stats["samples_ms"] == pytest.approx(list(range(1, 101)))  # the raw samples, for rank tests
    assert stats["stable"] is False and "IQR/median" in stats["unstable_reason"]


def test_a_tight_spread_is_stable_and_a_median_far_above_the_minimum_is_not():
    assert stability([1.0, 1.01, 1.02, 0.99, 1.0, 1.3])[0]
    # every call but one slowed alike (contention throughout): a tight IQR, yet far from what the code can do
    stable, why = stability([0.5, 2.0, 2.01, 2.02, 2.0, 2.01])
    assert not stable and "median/min" in why
    assert not stability([1.0, 1.0, 1.0])[0]  # too few samples to judge


def test_an_unstable_measurement_is_timed_again_and_a_stable_attempt_kept():
    clock = FakeClock()
    noisy = [0.001, 0.004] * 5
    stats = time_backend(scripted(clock, [0.001, *noisy, *[0.002] * 10]), warmup=1, iters=10, clock=clock)
    assert stats["attempts"] == 2 and stats["stable"] is True
    assert stats["p50_ms"] == pytest.approx(2) and stats["samples_ms"] == pytest.approx([2] * 10)


def test_a_measurement_still_unstable_after_its_retries_is_marked_so():
    clock = FakeClock()
    noisy = [0.001, 0.004] * 15
    stats = time_backend(scripted(clock, [0.001, *noisy]), warmup=1, iters=10, retries=2, clock=clock)
    assert stats["attempts"] == 3 and stats["stable"] is False and stats["unstable_reason"]


def test_sync_runs_inside_every_timed_call():
    clock = FakeClock()
    calls = []

    def sync():  # e.g. the device work that torch.cuda.synchronize waits for
        calls.append(1)
        clock.advance(0.002)

    stats = time_backend(scripted(clock, [0.001] * 10), warmup=2, iters=8, sync=sync, clock=clock)
    assert len(calls) == 10
    assert stats["p50_ms"] == pytest.approx(3) and stats["first_run_ms"] == pytest.approx(3)


def test_max_seconds_stops_a_slow_backend_after_min_iters():
    clock = FakeClock()
    stats = time_backend(scripted(clock, [1.0] * 100), warmup=10, iters=50, max_seconds=2.5, clock=clock)
    assert stats["iters"] == 5  # min_iters, although 3 would pass max_seconds


def test_summarize_refuses_no_durations():
    with pytest.raises(ValueError):
        summarize([])


def test_sweep_records_a_failing_backend_and_goes_on():
    def fast(x):
        return (lambda: None), None

    def broken(x):
        if len(x) > 1:
            raise RuntimeError("out of memory")
        return (lambda: None), None

    images = np.zeros((3, 1, 28, 28), np.float32)
    rows = sweep({"torch_eager": fast, "broken": broken}, images, [1, 4], warmup=1, iters=3)
    assert [(r["backend"], r["batch"], r["status"]) for r in rows] == [
        ("torch_eager", 1, "ok"),
        ("broken", 1, "ok"),
        ("torch_eager", 4, "ok"),
        ("broken", 4, "error"),
    ]
    assert rows[-1]["error"] == "RuntimeError: out of memory"
    assert "speedup_vs_torch_eager" in rows[1] and "speedup_vs_torch_eager" not in rows[3]
    assert "error" in format_table(rows)


def test_sweep_takes_turns_each_after_an_untimed_call_so_load_changes_hit_both():
    calls = []

    def backend(name):
        return lambda x: ((lambda: calls.append(name)), None)

    images = np.zeros((1, 1, 28, 28), np.float32)
    rows = sweep({"a": backend("a"), "b": backend("b")}, images, [1], warmup=2, iters=4, rounds=2, retries=0)
    # warm-up, then 2 turns each of one untimed call (the switch from the other runtime) and 2 timed ones
    assert calls == ["a", "a", "b", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert [r["iters"] for r in rows] == [4, 4] and [r["attempts"] for r in rows] == [1, 1]


def test_sweep_retimes_only_the_unstable_backend_in_turns():
    clock = FakeClock()
    steady = lambda x: ((lambda: clock.advance(0.002)), None)  # noqa: E731
    jitter = iter([0.001, 0.004] * 100)
    noisy = lambda x: ((lambda: clock.advance(next(jitter))), None)  # noqa: E731
    images = np.zeros((1, 1, 28, 28), np.float32)
    rows = sweep({"steady": steady, "noisy": noisy}, images, [1], warmup=1, iters=10, retries=2, clock=clock)
    by = {r["backend"]: r for r in rows}
    assert by["steady"]["stable"] and by["steady"]["attempts"] == 1
    assert not by["noisy"]["stable"] and by["noisy"]["attempts"] == 3 and by["noisy"]["unstable_reason"]


def _round(ort_ms, eager_ms, ort_stable=True):
    """One round's rows of a sweep at batch 1, from known calls."""
    rows = [
        {
            "variant": "model",
            "backend": name,
            "status": "ok",
            "attempts": 1,
            **summarize(np.asarray(ms) / 1e3),
        }
        for name, ms in (("ort_cpu", ort_ms), ("torch_eager", eager_ms))
    ]
    rows[0]["stable"] = ort_stable
    return rows


def test_rounds_are_pooled_keeping_each_rounds_samples_and_the_speedup_of_the_pooled_medians():
    fast, slow = [1.0, 1.0, 1.1, 1.0, 1.0], [1.5, 1.5, 1.6, 1.5, 1.5]
    eager = [3.0] * 5
    ort, torch_row = pool_rounds([_round(fast, eager), _round(slow, eager), _round(fast, eager)])
    assert ort["round_samples_ms"] == [fast, slow, fast] and ort["rounds"] == 3
    assert ort["round_p50_ms"] == [1.0, 1.5, 1.0] and ort["n"] == 15
    assert ort["p50_ms"] == pytest.approx(float(np.median(fast * 2 + slow)))
    assert ort["speedup_vs_torch_eager"] == pytest.approx(3.0 / ort["p50_ms"])
    assert torch_row["stable"] and ort["stable"]


def test_a_pooled_measurement_is_stable_when_most_rounds_were_and_a_failed_round_is_an_error():
    calls = [1.0] * 5
    ort, _ = pool_rounds([_round(calls, calls), _round(calls, calls, ort_stable=False)])
    assert ort["stable"] is False and ort["unstable_reason"].startswith("1 of 2 rounds unstable")
    ort, _ = pool_rounds([_round(calls, calls), _round(calls, calls, ort_stable=False), _round(calls, calls)])
    assert ort["stable"] is True and ort["round_stable"] == [True, False, True]
    broken = _round(calls, calls)
    broken[1] = {"variant": "model", "backend": "torch_eager", "batch": 1, "status": "error", "error": "boom"}
    _, eager = pool_rounds([_round(calls, calls), broken])
    assert eager["status"] == "error" and eager["error"] == "boom"


def test_take_batch_cycles_through_fewer_images():
    images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    assert take_batch(images, 5).ravel().tolist() == [0, 1, 2, 0, 1]


@pytest.mark.timing
def test_ort_and_torch_eager_are_timed_side_by_side(exported, fashion):
    e = exported["shallow"]
    backends = {"ort_cpu": ort_backend(make_session(e.path, "cpu")), "torch_eager": torch_backend(e.model)}
    rows = sweep(backends, fashion["test_x"].numpy(), [1, 3], warmup=1, iters=3, flops_per_image=1e7)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["batch"] for r in rows} == {1, 3}
    ort_row = next(r for r in rows if r["backend"] == "ort_cpu" and r["batch"] == 3)
    assert ort_row["speedup_vs_torch_eager"] > 0 and ort_row["gflops_per_s"] > 0
    table = format_table(rows)
    assert "ort_cpu p50 ms" in table and "x vs torch_eager (ort_cpu)" in table


def test_environment_names_cpu_threads_and_runtime_versions():
    env = runtime_environment()
    for key in (
        "cpu",
        "cpu_count",
        "cpu_affinity",
        "torch",
        "cpu_threads",
        "onnxruntime",
        "ort_available_providers",
    ):
        assert env[key] not in (None, "")
    # latency.json merges it with the suite's environment: one spelling per fact, the same value under it.
    from capsbench.suite.env import environment

    suite_env = environment()
    assert all(env[k] == suite_env[k] for k in set(env) & set(suite_env) if k != "git_commit")
    assert not {"cpu_cores", "torch_threads"} & set(env)


# ------------------------------------------------------------------- real timings: stability and check's gates


def _sweep_shallow(exported, fashion, slow_ort_s=0.0, batch_sizes=(1, 8)):
    """ORT and torch eager on the shallow net; `slow_ort_s` is a test hook adding a fixed sleep per ORT call."""
    e = exported["shallow"]
    ort_prepare = ort_backend(make_session(e.path, "cpu"))

    def slowed(x):
        run, sync = ort_prepare(x)
        return (lambda: (time.sleep(slow_ort_s), run())), sync

    backends = {"ort_cpu": slowed if slow_ort_s else ort_prepare, "torch_eager": torch_backend(e.model)}
    return sweep(backends, fashion["test_x"].numpy(), batch_sizes, warmup=5, iters=40, max_seconds=5)


def _run_folder(root, rows):
    """A run folder as the time stage writes it (only what `capsbench check` reads of latency)."""

    def write(path, kind, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema_version": 1, "kind": kind, **data}))

    write(root / "run.json", "run", {"environment": runtime_environment()})
    write(root / "cfg" / "config.json", "config", {"config_id": "cfg", "label": "shallow", "config": {}})
    rows = [{"variant": "model", **r} for r in rows]
    write(root / "cfg" / "latency.json", "latency", {"status": "complete", "rows": rows})
    return root


def _latency_verdicts(result):
    return {ch["metric"]: ch["status"] for ch in result["checks"] if "noise" in ch}


def _slower(rows, backend, factor):
    """The same measurement with every timed call of `backend` `factor` times as long: a change of known size
    on a real distribution of calls (its spread, its outliers, its stability verdict), which no load on the
    machine can move."""
    out = []
    for r in rows:
        r = dict(r)
        if r["backend"] == backend and r["status"] == "ok":
            r.update({k: v * factor for k, v in r.items() if k.endswith("_ms") and isinstance(v, float)})
            r["samples_ms"] = [x * factor for x in r["samples_ms"]]
        out.append(r)
    return out


def _speedup_verdicts(run, base):
    verdicts = _latency_verdicts(compare_runs(run, base, Tolerances()))
    return {b: verdicts[f"speedup_vs_eager[model/ort_cpu/{b}]"] for b in (1, 8)}


@pytest.mark.timing
def test_the_gate_flags_a_change_beyond_the_tolerance_and_never_one_within_it(exported, fashion, tmp_path):
    """What noise cannot change: one real measurement against itself with ORT 8 % slower (inside the 20 %
    tolerance) is never a regression, and with ORT 3x slower is one at every batch size whose measurements were
    stable (a tight spread: the interval cannot reach back to the tolerance), and 'unstable' at the others, on
    any machine however busy. How often two independent timings of one commit raise a false alarm is a
    measurement, not a property: scripts/same_commit_pairs.py measures it."""
    rows = _sweep_shallow(exported, fashion)
    base = _run_folder(tmp_path / "base", rows)
    within = _run_folder(tmp_path / "within", _slower(rows, "ort_cpu", 1.08))
    beyond = _run_folder(tmp_path / "beyond", _slower(rows, "ort_cpu", 3.0))
    same = compare_runs(within, base, Tolerances())
    assert same["same_machine"] and same["regressions"] == []
    assert "regressed" not in _latency_verdicts(same).values()
    stable = {b: all(r["stable"] for r in rows if r["batch"] == b) for b in (1, 8)}
    expected = {b: "regressed" if stable[b] else "unstable" for b in (1, 8)}
    assert _speedup_verdicts(beyond, base) == expected, rows


@pytest.mark.timing
def test_check_flags_a_real_slowdown_wherever_the_timing_was_stable(exported, fashion, tmp_path):
    """A real 3 ms sleep per ORT call (p50 ~0.3 ms at batch 1: a 2-10x fall of ORT's speedup over eager on
    any machine of this kind), timed in its own sweep: flagged wherever both measurements were stable; where the
    machine was too busy for a stable one, the gate refuses to judge, which is right."""
    base = _run_folder(tmp_path / "base", _sweep_shallow(exported, fashion))
    slow = _run_folder(tmp_path / "slow", _sweep_shallow(exported, fashion, slow_ort_s=0.003))
    gated = _speedup_verdicts(slow, base)
    if set(gated.values()) == {"unstable"}:
        pytest.skip("every gated measurement unstable: the machine is too busy to time (the gate refused)")
    assert set(gated.values()) <= {"regressed", "unstable"} and "regressed" in gated.values(), gated


@pytest.mark.timing
def test_timing_beside_a_busy_cpu_is_marked_unstable(exported, fashion):
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(default_threads())]
    try:
        time.sleep(0.5)  # the competitors are running
        rows = _sweep_shallow(exported, fashion, batch_sizes=(8,))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["stable"] for r in rows] == [False, False], [(r["backend"], r["unstable_reason"]) for r in rows]
    assert all(r["attempts"] == 3 for r in rows)  # repeated, still unstable


def test_ort_sessions_do_not_spin_after_a_run_unless_asked(exported):
    """Spinning pool threads would keep the cores from torch, timed next in the same process (issue 14)."""
    path = exported["shallow"].path
    quiet, spinning = make_session(path, "cpu"), make_session(path, "cpu", allow_spinning=True)
    entry = "session.intra_op.allow_spinning"
    assert quiet.session.get_session_options().get_session_config_entry(entry) == "0"
    assert quiet.info["allow_spinning"] is False and spinning.info["allow_spinning"] is True
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default: spinning
        spinning.session.get_session_options().get_session_config_entry(entry)


# ------------------------------------------------------------------- contention: other processes on the cores


def _competitor():
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running
    return p


def _other_cores_while(work, seconds=0.6):
    with Contention() as c:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            work()
    return c


@pytest.mark.timing
@pytest.mark.slow
def test_contention_counts_other_processes_cpu_time_and_not_this_ones():
    spin = _other_cores_while(lambda: None)  # this process busy on a core: not contention
    competitor = _competitor()
    try:
        beside = _other_cores_while(lambda: time.sleep(0.01))  # this process idle, the competitor spinning
    finally:
        competitor.kill()
        competitor.wait()
    assert spin.other_cores is not None and beside.other_cores is not None
    assert beside.other_cores - spin.other_cores > 0.6  # about one core, whatever else the machine does
    assert beside.verdict() is not None and "other processes used" in beside.verdict()
    assert beside.record()["contention_window_s"] >= 0.6


def _steady(x):
    """A backend whose every call takes 2 ms of sleep: a spread no competitor can widen."""
    return (lambda: time.sleep(0.002)), None


@pytest.mark.slow
def test_a_tight_measurement_beside_a_competing_process_is_unstable_for_that_reason():
    images = np.zeros((8, 1, 28, 28), np.float32)
    competitor = _competitor()
    try:
        (busy,) = sweep({"sleep": _steady}, images, (1,), warmup=2, iters=150, retries=1)
    finally:
        competitor.kill()
        competitor.wait()
    assert busy["iqr_rel"] < 0.2 and busy["other_cores"] > MAX_OTHER_CORES  # tight, yet the cores were shared
    assert busy["stable"] is False and "other processes used" in busy["unstable_reason"]
    assert busy["attempts"] == 2  # timed again, still beside the competitor
    single = time_backend(lambda: time.sleep(0.002), warmup=2, iters=150, retries=0)  # the same rule alone
    assert single["other_cores"] is not None and single["contention_window_s"] > 0.25


@pytest.mark.slow
def test_a_child_waited_for_inside_the_window_is_this_processs_own_work():
    """The C++ runner is a child process: its CPU time must not read as contention."""

    def child(code):
        with Contention() as c:
            subprocess.run([sys.executable, "-c", code], check=True)
        return c.other_cores

    spinning = child("import time\nt = time.time()\nwhile time.time() - t < 0.8: pass")
    sleeping = child("import time; time.sleep(0.8)")
    assert spinning is not None and sleeping is not None
    assert spinning < sleeping + 0.3  # a spinning child adds no contention (~1 core if it were counted)


def test_timing_holds_torch_to_ieee_fp32_as_ort_and_restores_the_setting():
    """torch 2.13 runs cuDNN convolutions in TF32 by default while ORT's CUDA provider runs with use_tf32=0: a
    CUDA speedup would compare different arithmetic. The harness's policy sets IEEE fp32 for the timing and
    gives the caller's settings back (CPU builds have the same switches, so this runs anywhere)."""
    from capsbench.export.latency import _tf32_knobs, fp32_torch

    knobs = _tf32_knobs()
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's own default for cuDNN convolutions
    try:
        before = [getattr(o, a) for o, a, _, _ in knobs]
        with fp32_torch() as policy:
            assert [getattr(o, a) for o, a, _, _ in knobs] == [v for _, _, v, _ in knobs]
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert [getattr(o, a) for o, a, _, _ in knobs] == before
    finally:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert policy["torch_tf32"] is False and policy["ort_cuda_use_tf32"] is False

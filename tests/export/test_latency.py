"""The timing harness: statistics on a known sequence of durations, sync inside the timed region, a sweep
that records a failing backend and goes on, real ORT and torch side by side."""

import numpy as np
import pytest

from capsbench.export import make_session, summarize, sweep, time_backend
from capsbench.export.latency import format_table, ort_backend, runtime_environment, take_batch, torch_backend


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
    stats = time_backend(scripted(clock, [first, *warm, *timed]), warmup=3, iters=100, batch=8, clock=clock)
    assert stats["iters"] == 100
    assert stats["first_run_ms"] == pytest.approx(500)
    assert stats["min_ms"] == pytest.approx(1) and stats["max_ms"] == pytest.approx(100)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert stats["throughput_ips"] == pytest.approx(8 / 0.0505)


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


def test_sweep_alternates_backends_in_rounds_so_load_changes_hit_both():
    calls = []

    def backend(name):
        return lambda x: ((lambda: calls.append(name)), None)

    images = np.zeros((1, 1, 28, 28), np.float32)
    rows = sweep({"a": backend("a"), "b": backend("b")}, images, [1], warmup=1, iters=4, rounds=2)
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]  # first runs, then 2 rounds of 2
    assert [r["iters"] for r in rows] == [4, 4]


def test_take_batch_cycles_through_fewer_images():
    images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    assert take_batch(images, 5).ravel().tolist() == [0, 1, 2, 0, 1]


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
    for key in ("cpu", "cpu_cores", "torch", "torch_threads", "onnxruntime", "ort_available_providers"):
        assert env[key] not in (None, "")

"""The timing harness's parts: the stability rule, `summarize` (the one summariser of raw samples, the C++
runner's included), the backends (ONNX Runtime, torch eager, torch.compile, CUDA graphs), the batch-size `sweep`,
the precision policy and the machine probe (`gemm_gflops`). export/timing.py runs them in rounds.

Every backend is timed by `time_backend` on the same inputs in the same process, so ratios are side by side.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

RunFn = Callable[[], Any]
Sync = Callable[[], None] | None
# A backend turns a batch of float32 images into (run_fn, sync) for the harness.
Prepare = Callable[[np.ndarray], tuple[RunFn, Sync]]

DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
REFERENCE = "torch_eager"


# The stability rule (see `stability`): thresholds on a measurement's own samples.
STABLE_MIN_SAMPLES = 5
STABLE_MAX_IQR_REL = 0.20
STABLE_MAX_P50_OVER_MIN = 1.5
# Other processes' CPU time while a measurement was timed, in cores (see `Contention`): above this, the
# measurement shared its cores and is unstable whatever its spread (a competitor that slows every call alike
# keeps the spread tight). Judged only over windows of at least CONTENTION_MIN_WINDOW_S, since /proc counts
# CPU time in clock ticks (10 ms).
MAX_OTHER_CORES = 0.25
CONTENTION_MIN_WINDOW_S = 0.25
RETRIES = 2  # an unstable measurement is timed again at most this many times
# ONNX Runtime captures a CUDA graph on its 2nd-3rd run: a graph backend runs this many times before timing.
MIN_GRAPH_WARMUP = 3


def stability(durations_ms: Sequence[float] | np.ndarray) -> tuple[bool, str | None]:
    """(stable, why not) for one measurement's timed calls.

    Rule: stable when there are at least STABLE_MIN_SAMPLES calls, the interquartile range is at most
    STABLE_MAX_IQR_REL of the median (a spread that other work on the cores widens), and the median is at
    most STABLE_MAX_P50_OVER_MIN times the fastest call (a whole measurement slowed by contention keeps a
    tight IQR but drifts away from its minimum, the minimum being what the code can do on a quiet core).
    """
    d = np.asarray(durations_ms, dtype=np.float64)
    if d.size < STABLE_MIN_SAMPLES:
        return False, f"{d.size} samples < {STABLE_MIN_SAMPLES}"
    q1, p50, q3 = np.percentile(d, [25, 50, 75])
    if p50 <= 0:
        return True, None
    if (q3 - q1) / p50 > STABLE_MAX_IQR_REL:
        return False, f"IQR/median {(q3 - q1) / p50:.2f} > {STABLE_MAX_IQR_REL}"
    if d.min() > 0 and p50 / d.min() > STABLE_MAX_P50_OVER_MIN:
        return False, f"median/min {p50 / d.min():.2f} > {STABLE_MAX_P50_OVER_MIN}"
    return True, None


STABILITY_RULE = {
    "min_samples": STABLE_MIN_SAMPLES,
    "max_iqr_over_median": STABLE_MAX_IQR_REL,
    "max_median_over_min": STABLE_MAX_P50_OVER_MIN,
    "max_other_cores": MAX_OTHER_CORES,
    "contention_min_window_s": CONTENTION_MIN_WINDOW_S,
    "retries": RETRIES,
    "rounds": "a measurement timed in rounds (fresh processes) is stable when more than half of them are",
}


class Contention:
    """How much CPU other processes took while a block ran: `with Contention() as c: ...; c.other_cores`.

    From Linux's /proc: all CPUs' busy time (user, nice, system, irq, softirq and steal, the time a hypervisor
    gave to other guests) minus this process's own (every thread of it, and the children it waited for, such as
    the C++ runner's process), over the wall time, in cores. A
    competitor spinning on one core reads about 1.0, a quiet machine about 0. `other_cores` is None where /proc
    is missing (not Linux) or the window was shorter than one clock tick. Accumulates over several `with`
    blocks: `window_s` is their total wall time.
    """

    _tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self) -> None:
        self.window_s = 0.0
        self._other_ticks = 0
        self._known = True

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
            # utime, stime, and those of children waited for (a C++ runner run to its end inside the window)
            return user + nice + system + irq + softirq + steal, sum(int(x) for x in own[11:15])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> Contention:
        self._start, self._t0 = self._ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end, wall = self._ticks(), time.perf_counter() - self._t0
        if self._start is None or end is None:
            self._known = False
            return
        self.window_s += wall
        self._other_ticks += (end[0] - self._start[0]) - (end[1] - self._start[1])

    @property
    def other_cores(self) -> float | None:
        if not self._known or self.window_s * self._tick < 1:
            return None
        return max(0.0, self._other_ticks / self._tick / self.window_s)

    def verdict(self) -> str | None:
        """Why a measurement made in this window is unstable (other processes took its cores), else None."""
        other = self.other_cores
        if other is None or self.window_s < CONTENTION_MIN_WINDOW_S or other <= MAX_OTHER_CORES:
            return None
        return f"other processes used {other:.2f} cores while timed > {MAX_OTHER_CORES}"

    def record(self) -> dict[str, Any]:
        other = self.other_cores
        return {
            "other_cores": None if other is None else round(other, 3),
            "contention_window_s": round(self.window_s, 3),
        }


def summarize(durations_s: Sequence[float], batch: int = 1, first_s: float | None = None) -> dict[str, Any]:
    """Latency statistics in ms (percentiles interpolate linearly), throughput in images/s at the median,
    the spread (IQR, IQR/median, coefficient of variation), the raw samples (`samples_ms`, for rank tests
    and bootstrap intervals in `capsbench check`) and the stability verdict of `stability`."""
    d = np.asarray(durations_s, dtype=np.float64) * 1e3
    if d.size == 0:
        raise ValueError("no timed iterations")
    q1, p50, q3 = (float(q) for q in np.percentile(d, [25, 50, 75]))
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if d.size > 1 else 0.0
    stable, why = stability(d)
    return {
        "batch": batch,
        "iters": int(d.size),
        "p50_ms": p50,
        "p90_ms": float(np.percentile(d, 90)),
        "p99_ms": float(np.percentile(d, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "min_ms": float(d.min()),
        "max_ms": float(d.max()),
        "first_run_ms": None if first_s is None else first_s * 1e3,
        "throughput_ips": batch / (p50 / 1e3) if p50 > 0 else float("inf"),
        "n": int(d.size),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "iqr_rel": (q3 - q1) / p50 if p50 > 0 else 0.0,
        "cv": std / mean if mean > 0 else 0.0,
        "stable": stable,
        "unstable_reason": why,
        "samples_ms": [round(float(x), 6) for x in d],
    }


SUMMARY_FIELDS = frozenset(summarize([1e-3], 1)) | {
    "attempts",
    "gflops_per_s",
    "gemm_fraction",
    "other_cores",
    "contention_window_s",
}


def judge_contention(stats: dict[str, Any], contention: Contention) -> dict[str, Any]:
    """`summarize`'s statistics with the CPU time other processes took meanwhile, unstable when they took
    more than MAX_OTHER_CORES."""
    stats.update(contention.record())
    busy = contention.verdict()
    if busy is not None and stats["stable"]:
        stats.update(stable=False, unstable_reason=busy)
    return stats


class _Timer:
    """One backend's calls: the first run alone, untimed warm-up, then timed calls in one or more chunks."""

    def __init__(self, run_fn: RunFn, sync: Sync, clock: Callable[[], float]):
        self.run_fn, self.sync, self.clock = run_fn, sync, clock
        self.first: float | None = None
        self.durations: list[float] = []

    def call(self) -> float:
        t0 = self.clock()
        self.run_fn()
        if self.sync is not None:  # inside the timed region: asynchronous device work is counted
            self.sync()
        return self.clock() - t0

    def warm(self, warmup: int, max_seconds: float | None) -> None:
        self.first = spent = self.call()
        for _ in range(max(warmup - 1, 0)):
            if max_seconds is not None and spent > max_seconds:
                break
            spent += self.call()

    def time(self, n: int, max_seconds: float | None, min_iters: int, until: bool = False) -> None:
        """n more timed calls (until `n` calls in all with `until`), stopping early past max_seconds."""
        for _ in range(n - len(self.durations) if until else n):
            if (
                max_seconds is not None
                and len(self.durations) >= min_iters
                and sum(self.durations) > max_seconds
            ):
                return
            self.durations.append(self.call())


def time_backend(
    run_fn: RunFn,
    warmup: int = 10,
    iters: int = 100,
    sync: Sync = None,
    *,
    batch: int = 1,
    max_seconds: float | None = None,
    min_iters: int = 5,
    retries: int = RETRIES,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time `run_fn` (one batch per call): the first call alone (compilation, cuDNN search land there; a CUDA
    graph is captured before, see `graph_backend`), then warmup - 1 more untimed calls, then `iters` timed
    calls. `sync` runs inside each timed call (torch.cuda.synchronize, IOBinding output sync) so asynchronous work is counted.
    `max_seconds` stops warm-up and timing early (after at least `min_iters` timed calls) for slow backends.

    An unstable measurement (see `stability`, or one timed while other processes took the cores, see
    `Contention`) is timed again, at most `retries` times (each attempt bounded by `max_seconds`); the first stable attempt is kept, else the one with the lowest median, marked
    `stable: false`. `attempts` says how many were made.
    """
    timer = _Timer(run_fn, sync, clock)
    timer.warm(warmup, max_seconds)
    best: dict[str, Any] | None = None
    attempts = 0
    while attempts <= retries and (best is None or not best["stable"]):
        attempts += 1
        timer.durations = []
        with Contention() as contention:
            timer.time(iters, max_seconds, min_iters)
        stats = judge_contention(summarize(timer.durations, batch, timer.first), contention)
        if best is None or stats["stable"] or stats["p50_ms"] < best["p50_ms"]:
            best = stats
    assert best is not None  # the loop runs at least once
    return {**best, "attempts": attempts}


def pool_rounds(
    rounds: Sequence[Sequence[dict[str, Any]]], reference: str = REFERENCE
) -> list[dict[str, Any]]:
    """One row per (variant, backend, batch) from the same sweep repeated in `rounds` fresh processes.

    Whole processes on a shared machine run at different speeds while each one's timed calls stay tight, so
    one process's spread understates the noise between runs (issue 14). The pooled row keeps every round's
    raw samples (`round_samples_ms`, what `capsbench check` resamples round by round) and median
    (`round_p50_ms`); its statistics are `summarize`'s over all samples together. It is stable when more than
    half of its rounds were (`stability`, `round_stable`): one disturbed process among three widens the
    interval `check` resamples from the rounds, it does not void the measurement. A backend that failed in
    any round is that round's error row.
    """
    keys: dict[tuple, list[dict[str, Any]]] = {}
    for rows in rounds:
        for r in rows:
            keys.setdefault((r.get("variant"), r["backend"], r["batch"]), []).append(r)
    pooled: list[dict[str, Any]] = []
    for (*_, batch), rows in keys.items():
        failed = next((r for r in rows if r.get("status") != "ok"), None)
        if failed is not None or len(rows) < len(rounds):
            pooled.append(failed or {**rows[0], "status": "error", "error": "missing from a round"})
            continue
        every = [x / 1e3 for r in rows for x in r["samples_ms"]]
        first = rows[0].get("first_run_ms")
        row = {
            k: v for k, v in rows[0].items() if k not in SUMMARY_FIELDS and not k.startswith("speedup_vs_")
        }
        row.update(summarize(every, batch, None if first is None else first / 1e3))
        unstable = [r for r in rows if not r.get("stable", True)]
        stable = 2 * len(unstable) < len(rows)
        row.update(
            status="ok",
            rounds=len(rows),
            round_p50_ms=[r["p50_ms"] for r in rows],
            round_samples_ms=[r["samples_ms"] for r in rows],
            round_stable=[bool(r.get("stable", True)) for r in rows],
            round_other_cores=[r.get("other_cores") for r in rows],
            stable=stable,
            unstable_reason=None
            if stable
            else f"{len(unstable)} of {len(rows)} rounds unstable: {unstable[0].get('unstable_reason')}",
            attempts=max(r.get("attempts", 1) for r in rows),
        )
        if rows[0].get("gflops_per_s") is not None:
            row["gflops_per_s"] = rows[0]["gflops_per_s"] * rows[0]["p50_ms"] / row["p50_ms"]
        pooled.append(row)
    for group in {(r.get("variant"), r["batch"]) for r in pooled}:
        add_speedups([r for r in pooled if (r.get("variant"), r["batch"]) == group], reference)
    return pooled


# ----------------------------------------------------------------------------------------------- backends


def ort_backend(session) -> Prepare:
    """An OrtSession: plain run on CPU, IOBinding with device buffers on CUDA (see OrtSession.runner)."""
    return session.runner


def torch_backend(
    model: torch.nn.Module, device: str | torch.device = "cpu", compile: bool = False
) -> Prepare:
    """torch eager (or torch.compile, whose errors surface on the first call) under inference_mode."""
    device = torch.device(device)
    model = model.eval().to(device)
    fn = torch.compile(model, dynamic=False) if compile else model
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def prepare(images: np.ndarray) -> tuple[RunFn, Sync]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device)

        def run() -> Any:
            with torch.inference_mode():
                return fn(x)

        return run, sync

    return prepare


# The precision policy of every timing (harness, time stage, GPU check, C++ runner): fp32 means fp32 on both
# sides. ONNX Runtime's CUDA provider runs with use_tf32=0 (sessions.py, runner.cpp); torch's cuDNN
# convolutions default to TF32 on Ampere and later, so torch is held to IEEE fp32 while it is timed.
PRECISION_POLICY = {"fp32": "ieee", "torch_tf32": False, "ort_cuda_use_tf32": False}


def _tf32_knobs() -> list[tuple[Any, str, Any, str]]:
    """(object, attribute, IEEE value, name) for torch's fp32-precision settings: the fp32_precision API where this
    torch has it, else the older allow_tf32 flags."""
    b = torch.backends
    knobs: list[tuple[Any, str, Any, str]] = []
    for name, owner in (("cudnn.conv", getattr(b.cudnn, "conv", None)), ("cuda.matmul", b.cuda.matmul)):
        if owner is not None and hasattr(owner, "fp32_precision"):
            knobs.append((owner, "fp32_precision", "ieee", f"torch.backends.{name}.fp32_precision"))
    if not knobs:
        knobs = [
            (b.cudnn, "allow_tf32", False, "torch.backends.cudnn.allow_tf32"),
            (b.cuda.matmul, "allow_tf32", False, "torch.backends.cuda.matmul.allow_tf32"),
        ]
    return knobs


@contextlib.contextmanager
def fp32_torch() -> Iterator[dict[str, Any]]:
    """torch in IEEE fp32 (no TF32) for the block, restored after; yields what it set, for the results."""
    knobs = _tf32_knobs()
    saved = [getattr(o, a) for o, a, _, _ in knobs]
    try:
        for o, a, v, _ in knobs:
            setattr(o, a, v)
        yield {**PRECISION_POLICY, "torch_settings": {name: v for _, _, v, name in knobs}}
    finally:
        for (o, a, _, _), v in zip(knobs, saved, strict=True):
            setattr(o, a, v)


def graph_backend(path, provider: str, threads: int | None = None) -> Prepare:
    """ORT with the whole graph captured (CUDA graphs): one session per batch size (a graph has fixed shapes).
    ONNX Runtime captures on the 2nd-3rd run, so the first MIN_GRAPH_WARMUP runs happen here, before the
    harness's own warm-up: however small the warm-up asked, the capture never lands in a timed call."""
    from capsbench.export.sessions import make_session

    def prepare(images: np.ndarray) -> tuple[RunFn, Sync]:
        run, sync = make_session(path, provider, threads, cuda_graph=True).runner(images)
        for _ in range(MIN_GRAPH_WARMUP):
            run()
            if sync is not None:
                sync()
        return run, sync

    return prepare


def delayed(prepare: Prepare, delay_ms: float) -> Prepare:
    """`prepare` with every call `delay_ms` slower: the test hook TimeSettings.ort_delay_ms, a real slowdown
    that `capsbench check` must flag (latency.json records it as "test_ort_delay_ms")."""
    delay = delay_ms / 1e3
    if not delay:
        return prepare

    def slowed(images: np.ndarray) -> tuple[RunFn, Sync]:
        run, sync = prepare(images)

        def delayed_run() -> Any:
            time.sleep(delay)
            return run()

        return delayed_run, sync

    return slowed


def take_batch(images: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` images, cycling through them when there are fewer."""
    idx = np.arange(batch) % len(images)
    return np.ascontiguousarray(images[idx], dtype=np.float32)


def sweep(
    backends: dict[str, Prepare],
    images: np.ndarray,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    warmup: int = 10,
    iters: int = 100,
    rounds: int = 5,
    max_seconds: float | None = None,
    min_iters: int = 5,
    retries: int = RETRIES,
    flops_per_image: float | None = None,
    reference: str = REFERENCE,
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """Every backend at every batch size, one flat row each, timed as `time_backend` does.

    Within a batch size the timed calls are split into `rounds` and the backends take turns, so a drift in
    machine speed (a shared CPU) hits them alike and their ratio stays fair. Each turn starts with one
    untimed call: the first call after another runtime ran pays for waking this runtime's threads and
    refilling caches (issue 14), and ONNX Runtime sessions do not spin (sessions.make_session), so no
    runtime's threads are busy while another is timed. Unstable measurements (see `stability`), and all of a
    batch size's when other processes took the cores meanwhile (`Contention`), are timed again, all in turns,
    at most `retries` times. A failing backend records its error and the sweep goes on.
    """
    rows: list[dict[str, Any]] = []
    per_round = max(1, -(-iters // max(rounds, 1)))
    for b in batch_sizes:
        x = take_batch(images, b)
        batch_rows: dict[str, dict[str, Any]] = {}
        timers: dict[str, _Timer] = {}
        for name, prepare in backends.items():
            batch_rows[name] = {"backend": name, "batch": b}
            try:
                timers[name] = _Timer(*prepare(x), clock)
                timers[name].warm(warmup, max_seconds)
            except Exception as e:  # noqa: BLE001 - the sweep records any backend failure and goes on
                timers.pop(name, None)
                batch_rows[name].update(status="error", error=_error(e))
        pending, attempts = dict(timers), 0
        while pending and attempts <= retries:
            attempts += 1
            for t in pending.values():
                t.durations = []
            with Contention() as contention:
                _take_turns(pending, iters, per_round, max_seconds, min_iters, batch_rows)
            for name in list(pending):
                stats = judge_contention(
                    summarize(pending[name].durations, b, pending[name].first), contention
                )
                stats["attempts"] = attempts
                row = batch_rows[name]
                if "p50_ms" not in row or stats["stable"] or stats["p50_ms"] < row["p50_ms"]:
                    row.update(stats, status="ok")
                row["attempts"] = attempts
                if row["stable"]:
                    del pending[name]
        for row in batch_rows.values():
            if row.get("status") == "ok" and flops_per_image:
                row["gflops_per_s"] = flops_per_image * b / (row["p50_ms"] / 1e3) / 1e9
        add_speedups(list(batch_rows.values()), reference)
        for row in batch_rows.values():
            if progress is not None:
                progress(_describe(row))
            rows.append(row)
        del timers, pending
    return rows


def _take_turns(
    timers: dict[str, _Timer],
    iters: int,
    per_round: int,
    max_seconds: float | None,
    min_iters: int,
    rows: dict[str, dict[str, Any]],
) -> None:
    """Timed calls of every backend in turns of `per_round`, each turn after one untimed call."""
    while timers and any(len(t.durations) < iters for t in timers.values()):
        before = {n: len(t.durations) for n, t in timers.items()}
        for name, timer in list(timers.items()):
            n = min(per_round, iters - len(timer.durations))
            if n <= 0:
                continue
            try:
                timer.call()  # untimed: the switch from the other runtime
                timer.time(len(timer.durations) + n, max_seconds, min_iters, until=True)
            except Exception as e:  # noqa: BLE001
                timers.pop(name)
                rows[name].update(status="error", error=_error(e))
        if all(len(t.durations) == before[n] for n, t in timers.items()):
            break  # every backend used up its max_seconds


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:500]}"


def add_speedups(rows: list[dict[str, Any]], reference: str = REFERENCE) -> None:
    """speedup_vs_<reference> = reference p50 / backend p50, for rows of one batch size."""
    ref = next((r for r in rows if r["backend"] == reference and r.get("status") == "ok"), None)
    for r in rows:
        if ref is not None and r.get("status") == "ok":
            r[f"speedup_vs_{reference}"] = ref["p50_ms"] / r["p50_ms"]


def _describe(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"  batch {row['batch']:>4} {row['backend']:<16} error: {row.get('error', '')[:100]}"
    return (
        f"  batch {row['batch']:>4} {row['backend']:<16} p50 {row['p50_ms']:9.3f} ms  "
        f"p90 {row['p90_ms']:9.3f}  min {row['min_ms']:9.3f}  IQR/p50 {row['iqr_rel']:5.2f}  "
        f"first {row['first_run_ms']:9.1f}  {row['throughput_ips']:9.0f} img/s"
        + ("" if row.get("stable", True) else f"  UNSTABLE ({row.get('unstable_reason')})")
    )


def format_table(rows: list[dict[str, Any]], reference: str = REFERENCE) -> str:
    """p50 (ms) per batch size and backend, and each backend's speedup over the reference (x > 1: faster)."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    others = [b for b in backends if b != reference]
    head = f"{'batch':>6}" + "".join(f"{b + ' p50 ms':>24}" for b in backends)
    head += "".join(f"{'x vs ' + reference + ' (' + b + ')':>34}" for b in others)
    lines = [head, "-" * len(head)]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        cells = {r["backend"]: r for r in rows if r["batch"] == batch}
        line = f"{batch:>6}"
        for b in backends:
            r = cells.get(b, {})
            line += f"{r['p50_ms']:>24.3f}" if r.get("status") == "ok" else f"{'error':>24}"
        for b in others:
            s = cells.get(b, {}).get(f"speedup_vs_{reference}")
            line += f"{s:>33.2f}x" if s is not None else f"{'-':>34}"
        lines.append(line)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- machine reference


def gemm_gflops(n: int = 2048, iters: int = 5, device: str | torch.device = "cpu") -> dict[str, Any]:
    """This machine's fp32 GEMM rate (an n x n torch.matmul at torch's current thread count): the roofline
    that a model's achieved GFLOP/s is compared with."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    stats = time_backend(lambda: torch.matmul(a, b), warmup=2, iters=iters, sync=sync)
    return {
        "n": n,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "p50_ms": stats["p50_ms"],
        "gflops_per_s": 2 * n**3 / (stats["p50_ms"] / 1e3) / 1e9,
        **{k: stats[k] for k in ("min_ms", "iqr_rel", "stable", "unstable_reason", "attempts", "samples_ms")},
    }


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set extensions that decide this CPU's fp32 and bf16 speed (what the machine-speed notes cite).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """The CPU, its ISA extensions (bf16 is emulated without avx512_bf16/amx_bf16) and its fp32 GEMM rate
    measured now (about 2 s): what every timing of this machine is to be read beside."""
    g = gemm_gflops()
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "isa": cpu_isa(),
        "gemm_gflops_per_s": round(g["gflops_per_s"], 1),
        "gemm_n": g["n"],
        "gemm_threads": g["threads"],
        "gemm_iqr_rel": g["iqr_rel"],
        "gemm_stable": g["stable"],
        "gemm_unstable_reason": g["unstable_reason"],
    }


def machine_line(m: dict[str, Any] | None = None) -> str:
    """`machine_info` (measured now unless given) as one line for logs."""
    m = m or machine_info()
    spread = f"IQR/median {m['gemm_iqr_rel']:.2f}" + (
        "" if m["gemm_stable"] else f", unstable: {m['gemm_unstable_reason']}"
    )
    return (
        f"{m['cpu']} ({m['cpus']} CPUs; {', '.join(m['isa']) or 'unknown'}); fp32 GEMM "
        f"{m['gemm_gflops_per_s']:.0f} GFLOP/s ({m['gemm_n']}x{m['gemm_n']} matmul, {m['gemm_threads']} threads, "
        f"{spread})"
    )


def _gpu_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def ort_build() -> dict[str, Any]:
    """Which ONNX Runtime package this is and the CUDA major its CUDA provider was built for (None: CPU-only)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return {}
    return {
        "package": getattr(info, "package_name", None),
        "cuda_version": getattr(info, "cuda_version", None),
    }


def runtime_environment() -> dict[str, Any]:
    """What timings were measured on: CPU, threads, runtime versions, GPU and driver when present."""
    import onnx
    import onnxruntime as ort

    from capsbench.export.sessions import default_threads

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        # Spelled as suite/env.environment spells them (the two are merged into one file): logical CPUs, the
        # ones this process may run on, and torch's intra-op threads.
        "cpu_count": os.cpu_count(),
        "cpu_affinity": default_threads(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_build": ort_build(),
        "ort_available_providers": ort.get_available_providers(),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews CPU timings: record how busy it was
        env["load_avg_1m"] = os.getloadavg()[0]
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_driver"] = _gpu_driver()
    return env

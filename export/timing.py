"""The timing procedure every latency figure goes through, whatever the backend: Python ONNX Runtime, torch eager
and torch.compile (`sweep_model`), the C++ runner (its raw samples, summarised by `latency.summarize`), and the
GPU check.

A *round* (`timed_round`) is one pass over every backend in one process: torch's threads set to the timing's,
torch held to IEEE fp32 (`latency.PRECISION_POLICY`, the one precision policy), the machine probe (an fp32
GEMM) at its start and its end, and a verdict on whether other processes took the cores meanwhile. `run_rounds`
repeats rounds, each in a fresh process where asked, sets aside the ones timed beside other work and stops
early once they agree; `pool` turns the rounds into one result's rows, machine probe and precision.

Nothing here knows about training, presets or run folders: a caller hands in an ONNX file, an nn.Module and
images, or a function that times one round.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export import latency as harness
from capsbench.export.sessions import make_session, placement_by_op, placement_summary
from capsbench.export.validate import graph_flops, load_onnx


@dataclass(frozen=True)
class TimeSettings:
    """How every backend is timed; also the cache key of a finished latency result (`to_dict`)."""

    batch_sizes: tuple[int, ...] = harness.DEFAULT_BATCH_SIZES
    iters: int = 50
    warmup: int = 5
    threads: int | None = None
    provider: str = "auto"
    compile: bool = False
    max_seconds: float | None = 10.0  # per backend and batch size, after at least 5 timed runs
    rounds: int = 3  # the whole sweep, each time in a fresh process (iters timed calls per round)
    # Stop after this many clean rounds when they agree (see `rounds_agree`); None: always `rounds`.
    min_rounds: int | None = None
    # A test hook: a fixed cost (ms) added to every ONNX Runtime call, a real slowdown that `check` must flag.
    # A setting, so a latency timed with it is never reused without it (and the other way round).
    ort_delay_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {**self.__dict__, "batch_sizes": list(self.batch_sizes)}
        if (
            not self.ort_delay_ms
        ):  # left out at 0: the settings of results timed before it existed still match
            del d["ort_delay_ms"]
        return d

    def probe_device(self) -> str:
        """Where the machine probe runs: the GPU when one may be timed, else the CPU."""
        return "cuda" if self.provider != "cpu" and torch.cuda.is_available() else "cpu"


# Rounds timed while other processes took the cores are replaced by new ones, at most this many.
EXTRA_ROUNDS = 2
# A config's timing is unstable when the machine probe (the fp32 GEMM rate, measured at the start and the end
# of every round) moved by more than this factor between its slowest and its fastest round; `capsbench check`
# does not gate two runs whose probes differ by more (see reports/compare.py). Five same-commit runs on a
# quiet 2-core VM stayed within 1.07 inside a run and 1.08 between runs (issue 14).
MAX_PROBE_DRIFT = 1.15
# Rounds agree when every measurement was stable in each and the figure `capsbench check` gates moved by at most
# this factor between them: ORT's speedup over torch eager timed in the same round (a process's speed moves both
# runtimes and cancels there), or, for rows timed without eager beside them (the C++ runner's), the p50. Then
# the spread between processes that further rounds would sample is small next to check's 20 % tolerance, and
# `--min-rounds` may stop there.
ROUNDS_AGREE = 1.10

Round = dict[str, Any]
# One round's work: (rows, facts about what was timed); see `timed_round`.
Sweep = Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]]


# ----------------------------------------------------------------------------------------------- one model


def sweep_model(
    onnx_path: Path,
    model: torch.nn.Module,
    images: np.ndarray,
    settings: TimeSettings,
    threads: int,
    *,
    placement: bool = False,
    label: str = "",
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every backend of one exported model at every batch size, side by side in this process: ONNX Runtime
    (IOBinding on CUDA, and CUDA graphs where the provider has them), torch eager and (settings.compile)
    torch.compile. Returns (rows, facts): the session, the model's FLOPs per image, the torch device, and
    where ORT put the nodes (`node_placement`, judged against the session's provider, and `placement_by_op`,
    the kernels per provider and op type; always off the CPU provider, on it only with `placement`).
    Rows of an ORT session that left compute on another provider say so (`placement_ok: False`)."""
    session = make_session(onnx_path, settings.provider, threads)
    flops = graph_flops(load_onnx(onnx_path, check=False), batch=1)["flops_per_image"]
    ep = session.execution_provider
    device = ep.device if ep.device == "cuda" and torch.cuda.is_available() else "cpu"
    summary = by_op = None
    if ep.name != "cpu" or placement:  # which nodes ORT silently left on the CPU: enforced on the rows below
        by_op = placement_by_op(onnx_path, images[:1], provider=ep.name, threads=threads)
        summary = placement_summary(by_op, session.provider)
    backends = {f"ort_{ep.name}": harness.delayed(harness.ort_backend(session), settings.ort_delay_ms)}
    if ep.graphs:  # a captured graph has fixed shapes: one session per batch size
        backends[f"ort_{ep.name}_graph"] = harness.graph_backend(onnx_path, ep.name, threads)
    backends["torch_eager"] = harness.torch_backend(model, device)
    if settings.compile:
        backends["torch_compile"] = harness.torch_backend(model, device, compile=True)
    if progress is not None:
        progress(f"{label}: {session.provider}, {threads} threads")
    problem = (summary or {}).get("problem")
    rows = []
    for row in harness.sweep(
        backends,
        images,
        settings.batch_sizes,
        warmup=settings.warmup,
        iters=settings.iters,
        max_seconds=settings.max_seconds,
        flops_per_image=flops,
        progress=progress,
    ):
        if problem is not None and row["backend"].startswith("ort_"):
            # Not what its name says: an ort_cuda row whose compute partly ran on the CPU. Kept, labelled,
            # and never gated by `capsbench check`.
            row = {**row, "placement_ok": False, "placement_problem": problem}
        rows.append(row)
    facts = {
        "session": session.info,
        "flops_per_image": flops,
        "torch_device": device,
        "node_placement": summary,
        "placement_by_op": by_op,
    }
    return rows, facts


# ----------------------------------------------------------------------------------------------- one round


def timed_round(sweep: Sweep, *, threads: int, probe_device: str = "cpu") -> Round:
    """One round: `sweep()` run with torch on `threads` threads and in IEEE fp32, between two machine probes.
    Returns sweep's facts and {rows, probes, gemm: {probe device: the first probe}, precision, contention: why
    the round is set aside (other processes took the cores; its rows are then marked unstable) or None}.
    torch's thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # torch and ORT get the same cores
    try:
        with harness.fp32_torch() as precision:  # fp32 on both sides: ORT's CUDA provider runs without TF32
            probes = [harness.gemm_gflops(device=probe_device)]
            rows, facts = sweep()
            probes.append(harness.gemm_gflops(device=probe_device))
    finally:
        torch.set_num_threads(before)
    contention = round_contention(rows)
    if contention is not None:
        mark_unstable(rows, contention)
    gemm = {probe_device: probes[0], **facts.pop("gemm", {})}
    return {
        **facts,
        "rows": rows,
        "probes": probes,
        "gemm": gemm,
        "precision": precision,
        "contention": contention,
    }


def round_contention(rows: list[dict[str, Any]]) -> str | None:
    """Why a whole round is set aside: other processes' CPU time over all its timed windows (each batch size's
    turns; rows of one batch size share theirs) above harness.MAX_OTHER_CORES, else None."""
    windows = {
        (r.get("variant"), r["batch"]): (r["other_cores"], r["contention_window_s"])
        for r in rows
        if r.get("other_cores") is not None
    }
    total = sum(w for _, w in windows.values())
    if total < harness.CONTENTION_MIN_WINDOW_S:
        return None
    other = sum(o * w for o, w in windows.values()) / total
    if other <= harness.MAX_OTHER_CORES:
        return None
    return f"other processes used {other:.2f} cores during the round > {harness.MAX_OTHER_CORES}"


def mark_unstable(rows: list[dict[str, Any]], why: str) -> None:
    """Mark every timed row still counted stable as unstable, for `why` (a cause the rows' own spread cannot
    show: the machine's speed or other work during the whole round or run)."""
    for row in rows:
        if row.get("status") == "ok" and row.get("stable", True):
            row.update(stable=False, unstable_reason=why)


# ---------------------------------------------------------------------------------------------- the rounds


def run_rounds(
    fn: Callable[..., Round],
    args: tuple[Any, ...],
    settings: TimeSettings,
    *,
    fresh_process: bool = True,
    label: str = "",
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Round], list[str]]:
    """`fn(*args)` (a round, see `timed_round`) `settings.rounds` times, each in a fresh process when
    `fresh_process` (fn and args must then pickle): whole processes on a shared machine run at different
    speeds (issue 14), so the noise `capsbench check` gates on must include the spread between processes,
    not only within one. A backend that is its own process (the C++ runner) runs its rounds from here.
    Rounds timed beside other work are set aside and replaced (`clean_rounds`); timing stops after
    `least_rounds` clean rounds that agree (`rounds_agree`). Returns (the rounds to pool, the reasons of those
    set aside)."""
    spawn = multiprocessing.get_context("spawn")

    def one_round(n: int, clean: int) -> Round:
        if progress is not None:
            where = " in a fresh process" if fresh_process else ""
            progress(f"{label}: timing round {n} ({clean}/{settings.rounds} clean so far){where}")
        r = in_worker(spawn, fn, *args) if fresh_process else fn(*args)
        if r["contention"] is not None and progress is not None:
            progress(f"{label}: round {n} timed beside other work: {r['contention']}")
        return r

    least = least_rounds(settings)
    return clean_rounds(
        one_round, max(settings.rounds, 1), enough=lambda clean: len(clean) >= least and rounds_agree(clean)
    )


def least_rounds(settings: TimeSettings) -> int:
    """The rounds after which timing may stop when they agree: --min-rounds (never fewer than 2: one round
    cannot agree with itself, nor show the spread between processes), else all of them."""
    wanted = max(settings.rounds, 1)
    return wanted if settings.min_rounds is None else min(max(settings.min_rounds, 2), wanted)


def rounds_agree(rounds: list[dict[str, Any]], within: float = ROUNDS_AGREE) -> bool:
    """Whether clean rounds (each a round's result, or {"rows": ...}) agree: every row ok and stable in
    every round, and each gated figure within `within` between its highest and lowest round."""
    figures: dict[tuple, list[float]] = {}
    for r in rounds:
        for row in r["rows"]:
            if row.get("status") != "ok" or not row.get("stable", False):
                return False
            key = (row.get("variant"), row["backend"], row["batch"])
            speedup = next((v for k, v in row.items() if k.startswith("speedup_vs_")), None)
            if speedup is not None:
                figures.setdefault(key, []).append(speedup)
            elif row["backend"] != harness.REFERENCE:  # eager itself enters through the speedups
                figures.setdefault(key, []).append(row["p50_ms"])
    return bool(figures) and all(
        len(v) == len(rounds) and min(v) > 0 and max(v) / min(v) <= within for v in figures.values()
    )


def in_worker(context, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh worker process. Interrupted (Ctrl-C, or SIGTERM, which the CLI turns into the same),
    the worker is killed at once instead of being waited for to the end of its round."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
    try:
        result = pool.submit(fn, *args).result()
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return result


def clean_rounds(
    one_round: Callable[[int, int], Round],
    wanted: int,
    extra: int = EXTRA_ROUNDS,
    enough: Callable[[list[Round]], bool] | None = None,
) -> tuple[list[Round], list[str]]:
    """`wanted` rounds from `one_round(number, clean so far)`, or fewer once `enough(clean rounds)` says so. A
    round during which other processes took more than harness.MAX_OTHER_CORES of the CPU (its `contention`, a
    reason) is set aside and another is timed, at most `extra` more, and none once most of the rounds so far
    were contended (the other work is not passing: waiting longer would not help). Returns (the rounds to
    pool, the reasons of those set aside). If too few clean rounds came, the contended ones are pooled too,
    their rows marked unstable: nothing is set aside."""
    clean: list[Round] = []
    contended: list[Round] = []
    while len(clean) < wanted and len(clean) + len(contended) < wanted + extra:
        if len(clean) + len(contended) >= wanted and 2 * len(contended) > len(clean) + len(contended):
            break
        r = one_round(len(clean) + len(contended) + 1, len(clean))
        (clean if r["contention"] is None else contended).append(r)
        if r["contention"] is None and enough is not None and enough(clean):
            return clean, [c["contention"] for c in contended]
    if len(clean) >= wanted:
        return clean, [r["contention"] for r in contended]
    return clean + contended, []


# ------------------------------------------------------------------------------------------------- pooling


def pool(rounds: list[Round], set_aside: list[str], settings: TimeSettings) -> dict[str, Any]:
    """The rounds as one result: the rows pooled (`latency.pool_rounds`), the machine probe (`machine_probe`;
    every row unstable when it drifted past MAX_PROBE_DRIFT), the GEMM rate per device (`pool_gemm`), the
    precision, and how many rounds ran and why any were set aside."""
    rows = harness.pool_rounds([r["rows"] for r in rounds])
    probe = machine_probe(rounds)
    if probe["drift"] > MAX_PROBE_DRIFT:
        mark_unstable(
            rows,
            f"the machine's speed changed while timing: the fp32 GEMM probe's fastest call varied "
            f"{probe['drift']:.2f}x > {MAX_PROBE_DRIFT}x between rounds",
        )
    return {
        "stability_rule": harness.STABILITY_RULE,
        "rounds": len(rounds),
        # fewer than settings.rounds: the first min_rounds clean rounds agreed (rounds_agree), so none more ran
        "rounds_agreed_early": len(rounds) < max(settings.rounds, 1),
        "rounds_set_aside": set_aside,
        "machine_probe": probe,
        "gemm": {device: pool_gemm([r["gemm"][device] for r in rounds]) for device in rounds[0]["gemm"]},
        "precision": rounds[0]["precision"],
        "rows": rows,
    }


def machine_probe(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The fp32 GEMM probe of every round (at its start and its end): how fast the machine ran while this
    config was timed (`min_ms`: the median over the probes of each one's fastest call, what the machine could
    do then; a slow call or two inside one probe does not move it) and how much that moved between rounds
    (`drift`: the slowest round's fastest probe call over the fastest round's; one slow probe in a round does
    not move it)."""
    probes = [p for r in rounds for p in r["probes"]]
    p50s, mins = [p["p50_ms"] for p in probes], [p["min_ms"] for p in probes]
    round_fastest = [min(p["min_ms"] for p in r["probes"]) for r in rounds]
    return {
        "what": f"torch.matmul {probes[0]['n']}x{probes[0]['n']} fp32 at the start and the end of every round",
        "device": probes[0]["device"],
        "threads": probes[0]["threads"],
        "gflops_per_s": 2 * probes[0]["n"] ** 3 / (float(np.median(p50s)) / 1e3) / 1e9,
        "p50_ms": float(np.median(p50s)),
        "min_ms": float(np.median(mins)),
        "drift": max(round_fastest) / min(round_fastest),
        "stable": all(p["stable"] for p in probes),
        "samples_ms": [x for p in probes for x in p["samples_ms"]],
        "round_samples_ms": [[x for p in r["probes"] for x in p["samples_ms"]] for r in rounds],
        "round_p50_ms": [[p["p50_ms"] for p in r["probes"]] for r in rounds],
        "round_min_ms": [[p["min_ms"] for p in r["probes"]] for r in rounds],
    }


def pool_gemm(records: list[dict]) -> dict:
    """The GEMM rate of several rounds: the median over every round's timed calls, each round's kept."""
    every = [x for r in records for x in r["samples_ms"]]
    p50 = float(np.median(every))
    n = records[0]["n"]
    return {
        **records[0],
        "p50_ms": p50,
        "gflops_per_s": 2 * n**3 / (p50 / 1e3) / 1e9,
        "min_ms": min(r["min_ms"] for r in records),
        "stable": all(r["stable"] for r in records),
        "samples_ms": every,
        "round_samples_ms": [r["samples_ms"] for r in records],
    }

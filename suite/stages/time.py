"""The time stage: every exported model of a config on every backend (ORT, torch eager, torch.compile) and batch
size -> latency.json, from the one timing harness of export/latency.py."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export import graph_flops, load_onnx, make_session, runtime_environment
from capsbench.export import latency as harness
from capsbench.export.sessions import default_threads, placement_by_op, placement_summary
from capsbench.suite import rundir
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model
from capsbench.suite.env import environment
from capsbench.suite.errors import CheckpointError
from capsbench.suite.presets import RunConfig
from capsbench.suite.rundir import (
    LATENCY_FILE,
    exported_variants,
    read_if_valid,
    read_result,
    sha256,
    write_json,
)
from capsbench.suite.stages.base import Context, Stage
from capsbench.suite.stages.export import not_trained_message


@dataclass(frozen=True)
class TimeSettings:
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


def finished_latency(path: Path, settings: TimeSettings, onnx_shas: dict[str, str]) -> dict | None:
    """A complete latency result (Python's or the C++ runner's) of these settings and these ONNX files."""
    res = read_if_valid(path, "latency")
    if res is None:
        return None
    same = res.get("settings") == settings.to_dict() and res.get("onnx_sha256") == onnx_shas
    # Rows from before the rounds' raw samples were kept cannot be gated on noise: time them again.
    same = same and all("round_samples_ms" in r for r in res.get("rows", []) if r.get("status") == "ok")
    return res if same and res.get("status") == "complete" else None


def verified_onnx(out: Path, variants: list[rundir.Variant]) -> dict[str, str]:
    """{variant: sha256 of its model.onnx}, after checking that each file is the one export wrote (the hash in
    export.json) from the checkpoint that is there now: nothing measures a swapped or stale model."""
    shas = {}
    for v in variants:
        info = read_result(out / v.export, "export")
        if info.get("checkpoint_sha256") != sha256(out / v.checkpoint):
            raise CheckpointError(
                f"{out / v.onnx}: exported from an older {v.checkpoint}; run 'capsbench export' again first"
            )
        shas[v.name] = sha256(out / v.onnx)
        if info.get("onnx_sha256") != shas[v.name]:
            raise CheckpointError(
                f"{out / v.onnx}: not the file export wrote (sha256 {shas[v.name][:12]}, export.json records "
                f"{str(info.get('onnx_sha256'))[:12]}); run 'capsbench export --force' first"
            )
    return shas


def time_config(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    settings: TimeSettings,
    *,
    force: bool = False,
    gemm_cache: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every exported model of a config on every backend and batch size -> latency.json.

    Each row's gemm_fraction compares its GFLOP/s with this machine's fp32 GEMM rate on the same device and
    threads (measured once per device into `gemm_cache`, so a grid pays for it once).
    """
    out = Path(out_dir)
    variants = exported_variants(out)
    if not variants:
        if not rundir.is_trained(out):
            raise CheckpointError(not_trained_message(cfg, out))
        raise CheckpointError(f"{cfg.id}: no exported model in {out}; run 'capsbench export' first")
    shas = verified_onnx(out, variants)
    if not force and (done := finished_latency(out / LATENCY_FILE, settings, shas)) is not None:
        return {**done, "skipped": True}

    threads = settings.threads or default_threads()
    images = training.test_images(splits(), max(settings.batch_sizes)).numpy()
    gemm_cache = {} if gemm_cache is None else gemm_cache
    rounds, set_aside = _timed_rounds(cfg, out, settings, images, threads, progress)
    first = rounds[0]
    rows = harness.pool_rounds([r["rows"] for r in rounds])
    probe = machine_probe(rounds)
    if probe["drift"] > MAX_PROBE_DRIFT:
        _mark_unstable(
            rows,
            f"the machine's speed changed while timing: the fp32 GEMM probe's fastest call varied "
            f"{probe['drift']:.2f}x > {MAX_PROBE_DRIFT}x between rounds",
        )
    devices = first["torch_device"]
    for device in dict.fromkeys(devices.values()):
        gemm_cache.setdefault(device, _pool_gemm([r["gemm"][device] for r in rounds]))
    for row in rows:
        if row.get("gflops_per_s") is not None:
            row["gemm_fraction"] = row["gflops_per_s"] / gemm_cache[devices[row["variant"]]]["gflops_per_s"]
    sessions, flops, placement = first["sessions"], first["flops_per_image"], first["node_placement"]
    result = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": "complete",
        "settings": settings.to_dict(),
        "onnx_sha256": shas,
        "sessions": sessions,
        "node_placement": placement or None,
        "torch_device": devices,
        "flops_per_image": flops,
        "gemm": gemm_cache.get(devices[variants[0].name]),
        "environment": {**environment(torch.device("cpu")), **runtime_environment()},
        "stability_rule": harness.STABILITY_RULE,
        "rounds": len(rounds),
        # fewer than settings.rounds: the first min_rounds clean rounds agreed (rounds_agree), so none more ran
        "rounds_agreed_early": len(rounds) < max(settings.rounds, 1),
        "rounds_set_aside": set_aside,
        "machine_probe": probe,
        "precision": first["precision"],
        **({"test_ort_delay_ms": settings.ort_delay_ms} if settings.ort_delay_ms else {}),
        "rows": rows,
    }
    write_json(out / LATENCY_FILE, "latency", result)
    return result


# Rounds timed while other processes took the cores are replaced by new ones, at most this many.
EXTRA_ROUNDS = 2
# A config's timing is unstable when the machine probe (the fp32 GEMM rate, measured at the start and the end
# of every round) moved by more than this factor between its slowest and its fastest round; `capsbench check`
# does not gate two runs whose probes differ by more (see reports/compare.py). Five same-commit runs on a
# quiet 2-core VM stayed within 1.07 inside a run and 1.08 between runs (issue 14).
MAX_PROBE_DRIFT = 1.15


def _timed_rounds(
    cfg: RunConfig,
    out: Path,
    settings: TimeSettings,
    images: np.ndarray,
    threads: int,
    progress: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """`settings.rounds` rounds, each in a fresh process: whole processes on a shared machine run at different
    speeds (issue 14), so the noise `capsbench check` gates on must include the spread between processes, not
    only within one (see `clean_rounds` for rounds timed while other processes took the cores)."""
    spawn = multiprocessing.get_context("spawn")

    def one_round(n: int, clean: int) -> dict[str, Any]:
        if progress is not None:
            progress(
                f"{cfg.id}: timing round {n} ({clean}/{settings.rounds} clean so far) in a fresh process"
            )
        r = in_worker(spawn, _time_round, cfg, out, settings, images, threads, progress is not None)
        if r["contention"] is not None and progress is not None:
            progress(f"{cfg.id}: round {n} timed beside other work: {r['contention']}")
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


# Rounds agree when every measurement was stable in each and the figure `capsbench check` gates moved by at most
# this factor between them: ORT's speedup over torch eager timed in the same round (a process's speed moves both
# runtimes and cancels there), or, for rows timed without eager beside them (the C++ runner's), the p50. Then
# the spread between processes that further rounds would sample is small next to check's 20 % tolerance, and
# `--min-rounds` may stop there.
ROUNDS_AGREE = 1.10


def rounds_agree(rounds: list[dict[str, Any]], within: float = ROUNDS_AGREE) -> bool:
    """Whether clean rounds (each `_time_round`'s result, or {"rows": ...}) agree: every row ok and stable in
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
    one_round: Callable[[int, int], dict[str, Any]],
    wanted: int,
    extra: int = EXTRA_ROUNDS,
    enough: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """`wanted` rounds from `one_round(number, clean so far)`, or fewer once `enough(clean rounds)` says so. A
    round during which other processes took more than harness.MAX_OTHER_CORES of the CPU (its `contention`, a
    reason) is set aside and another is timed, at most `extra` more, and none once most of the rounds so far
    were contended (the other work is not passing: waiting longer would not help). Returns (the rounds to
    pool, the reasons of those set aside). If too few clean rounds came, the contended ones are pooled too,
    their rows marked unstable: nothing is set aside."""
    clean: list[dict[str, Any]] = []
    contended: list[dict[str, Any]] = []
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


def _mark_unstable(rows: list[dict[str, Any]], why: str) -> None:
    """Mark every timed row still counted stable as unstable, for `why` (a cause the rows' own spread cannot
    show: the machine's speed or other work during the whole round or run)."""
    for row in rows:
        if row.get("status") == "ok" and row.get("stable", True):
            row.update(stable=False, unstable_reason=why)


def _round_contention(rows: list[dict[str, Any]]) -> str | None:
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


def _time_round(
    cfg: RunConfig, out: Path, settings: TimeSettings, images: np.ndarray, threads: int, verbose: bool
) -> dict[str, Any]:
    """One round of the time stage, run in a fresh process: every variant's backends swept once, this
    process's GEMM rate per device, the machine probe at the start and the end, and whether other processes
    took the cores meanwhile (`contention`, a reason, or None)."""
    torch.set_num_threads(threads)  # torch and ORT get the same cores
    with harness.fp32_torch() as precision:  # fp32 on both sides: ORT's CUDA provider runs without TF32
        result = _sweep_round(cfg, out, settings, images, threads, verbose)
    return {**result, "precision": precision}


def _sweep_round(
    cfg: RunConfig, out: Path, settings: TimeSettings, images: np.ndarray, threads: int, verbose: bool
) -> dict[str, Any]:
    say = (lambda line: print(line, flush=True)) if verbose else None
    rows, sessions, flops, placement, devices, gemm = [], {}, {}, {}, {}, {}
    probe_device = "cuda" if settings.provider != "cpu" and torch.cuda.is_available() else "cpu"
    probes = [harness.gemm_gflops(device=probe_device)]
    gemm[probe_device] = probes[0]
    for v in exported_variants(out):
        session = make_session(out / v.onnx, settings.provider, threads)
        sessions[v.name] = session.info
        flops[v.name] = graph_flops(load_onnx(out / v.onnx, check=False), batch=1)["flops_per_image"]
        ep = session.execution_provider
        device = ep.device if ep.device == "cuda" and torch.cuda.is_available() else "cpu"
        devices[v.name] = device
        if device not in gemm:
            gemm[device] = harness.gemm_gflops(device=device)
        model = load_model(cfg, out / v.checkpoint)
        backends = {f"ort_{ep.name}": _delayed(harness.ort_backend(session), settings.ort_delay_ms)}
        if ep.name != "cpu":  # which nodes ORT silently left on the CPU: enforced on the rows below
            by_op = placement_by_op(out / v.onnx, images[:1], provider=ep.name, threads=threads)
            placement[v.name] = placement_summary(by_op, session.provider)
        if ep.graphs:
            backends[f"ort_{ep.name}_graph"] = harness.graph_backend(out / v.onnx, ep.name, threads)
        backends["torch_eager"] = harness.torch_backend(model, device)
        if settings.compile:
            backends["torch_compile"] = harness.torch_backend(model, device, compile=True)
        if say is not None:
            say(f"{cfg.id} {v.name}: {session.provider}, {threads} threads")
        for row in harness.sweep(
            backends,
            images,
            settings.batch_sizes,
            warmup=settings.warmup,
            iters=settings.iters,
            max_seconds=settings.max_seconds,
            flops_per_image=flops[v.name],
            progress=say,
        ):
            problem = (placement.get(v.name) or {}).get("problem")
            if problem is not None and row["backend"].startswith("ort_"):
                # Not what its name says: an ort_cuda row whose compute partly ran on the CPU. Kept, labelled,
                # and never gated by `capsbench check`.
                row = {**row, "placement_ok": False, "placement_problem": problem}
            rows.append({"variant": v.name, **row})
        del session, model, backends
    probes.append(harness.gemm_gflops(device=probe_device))
    contention = _round_contention(rows)
    if contention is not None:
        _mark_unstable(rows, contention)
    return {
        "contention": contention,
        "probes": probes,
        "rows": rows,
        "sessions": sessions,
        "flops_per_image": flops,
        "node_placement": placement or None,
        "torch_device": devices,
        "gemm": gemm,
    }


def _delayed(prepare: harness.Prepare, delay_ms: float) -> harness.Prepare:
    """The test hook TimeSettings.ort_delay_ms: every ONNX Runtime call `delay_ms` slower (latency.json records
    it as "test_ort_delay_ms")."""
    delay = delay_ms / 1e3
    if not delay:
        return prepare

    def slowed(images: np.ndarray):
        run, sync = prepare(images)

        def delayed_run():
            time.sleep(delay)
            return run()

        return delayed_run, sync

    return slowed


def _pool_gemm(records: list[dict]) -> dict:
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


def format_latency(result: dict) -> str:
    """The p50 table per variant, with ORT's speedup over torch eager and GFLOP/s against the GEMM rate."""
    parts = []
    for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["variant"] == variant]
        gflop = result["flops_per_image"][variant] / 1e9
        parts.append(f"{result['config_id']} {variant} ({gflop:.3f} GFLOP/image)  {result['label']}")
        parts.append(harness.format_table(rows))
        ok = [r for r in rows if r.get("status") == "ok" and r.get("gemm_fraction") is not None]
        if ok and result.get("gemm"):
            best = max(ok, key=lambda r: r["gflops_per_s"])
            parts.append(
                f"best: {best['backend']} at batch {best['batch']}: {best['gflops_per_s']:.1f} GFLOP/s = "
                f"{100 * best['gemm_fraction']:.0f}% of the {result['gemm']['gflops_per_s']:.1f} GFLOP/s fp32 "
                f"GEMM rate"
            )
        errors = [r for r in rows if r.get("status") != "ok"]
        parts.extend(f"  {r['backend']} batch {r['batch']}: {r['error']}" for r in errors)
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------- stage


def _shas(out: Path) -> dict[str, str]:
    return {v.name: sha256(out / v.onnx) for v in exported_variants(out)}


def done(ctx: Context) -> bool:
    s = ctx.settings
    return (
        not s.force
        and finished_latency(ctx.out / LATENCY_FILE, s.time or TimeSettings(), _shas(ctx.out)) is not None
    )


def run(ctx: Context) -> dict:
    return time_config(
        ctx.cfg,
        ctx.out,
        ctx.splits,
        ctx.settings.time or TimeSettings(),
        force=ctx.settings.force,
        gemm_cache=ctx.shared.setdefault("gemm", {}),
        progress=ctx.log if ctx.settings.progress else None,
    )


STAGE = Stage(
    "time",
    run=run,
    done=done,
    help="latency in ONNX Runtime, torch eager (and torch.compile) per batch size",
)

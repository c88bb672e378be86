"""The time stage: every exported model of a config on every backend (ORT, torch eager, torch.compile) and batch
size -> latency.json, from the one timing harness of export/latency.py."""

from __future__ import annotations

import multiprocessing
import os
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
from capsbench.export.sessions import default_threads, node_placement
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

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "batch_sizes": list(self.batch_sizes)}


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
    rounds = []
    # Each round in a fresh process: whole processes on a shared machine run at different speeds (issue 14),
    # so the noise `capsbench check` gates on must include the spread between processes, not only within one.
    spawn = multiprocessing.get_context("spawn")
    for i in range(max(settings.rounds, 1)):
        if progress is not None:
            progress(f"{cfg.id}: timing round {i + 1}/{max(settings.rounds, 1)} in a fresh process")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            rounds.append(
                pool.submit(_time_round, cfg, out, settings, images, threads, progress is not None).result()
            )
    first = rounds[0]
    rows = harness.pool_rounds([r["rows"] for r in rounds])
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
        **(
            {"test_ort_delay_ms": float(os.environ[TEST_DELAY_ENV])} if os.environ.get(TEST_DELAY_ENV) else {}
        ),
        "rows": rows,
    }
    write_json(out / LATENCY_FILE, "latency", result)
    return result


def _time_round(
    cfg: RunConfig, out: Path, settings: TimeSettings, images: np.ndarray, threads: int, verbose: bool
) -> dict[str, Any]:
    """One round of the time stage, run in a fresh process: every variant's backends swept once, and this
    process's GEMM rate per device."""
    torch.set_num_threads(threads)  # torch and ORT get the same cores
    say = (lambda line: print(line, flush=True)) if verbose else None
    rows, sessions, flops, placement, devices, gemm = [], {}, {}, {}, {}, {}
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
        backends = {f"ort_{ep.name}": _delayed(harness.ort_backend(session))}
        if ep.name != "cpu":  # which nodes ORT silently left on the CPU
            placement[v.name] = node_placement(out / v.onnx, images[:1], provider=ep.name, threads=threads)
        if ep.graphs:
            backends[f"ort_{ep.name}_graph"] = _graph_backend(out / v.onnx, ep.name, threads)
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
            rows.append({"variant": v.name, **row})
        del session, model, backends
    return {
        "rows": rows,
        "sessions": sessions,
        "flops_per_image": flops,
        "node_placement": placement or None,
        "torch_device": devices,
        "gemm": gemm,
    }


# A test hook: a fixed cost (ms) added to every ONNX Runtime call, a real slowdown that 'capsbench check' must
# flag. Results timed with it say so in their settings' environment (latency.json "test_ort_delay_ms").
TEST_DELAY_ENV = "CAPSBENCH_TEST_ORT_DELAY_MS"


def _delayed(prepare: harness.Prepare) -> harness.Prepare:
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0) / 1e3
    if not delay:
        return prepare

    def slowed(images: np.ndarray):
        run, sync = prepare(images)
        return (lambda: (time.sleep(delay), run())[1]), sync

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


def _graph_backend(path: Path, provider: str, threads: int) -> harness.Prepare:
    """ORT with the whole graph captured (CUDA graphs): one session per batch size (a graph has fixed shapes)."""

    def prepare(images: np.ndarray):
        return make_session(path, provider, threads, cuda_graph=True).runner(images)

    return prepare


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
    reads=(
        rundir.ONNX_FILE,
        rundir.EXPORT_FILE,
        rundir.CHECKPOINT_FILE,
        "prune_*/" + rundir.ONNX_FILE,
        "prune_*/" + rundir.EXPORT_FILE,
    ),
    writes=(LATENCY_FILE,),
    run=run,
    done=done,
    help="latency in ONNX Runtime, torch eager (and torch.compile) per batch size",
)

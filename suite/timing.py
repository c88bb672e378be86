"""The work of the two timing stages, on one config's run folder: `time_config` (Python ONNX Runtime beside torch
eager and torch.compile -> latency.json) and `time_config_cpp` (the C++ runner -> latency_cpp.json, its outputs
checked against PyTorch's). Both time through export/timing.py: the same rounds, precision policy and machine
probe, the same pooling and row schema. What is here is what export/ must not know: the run folder, the
checkpoints and the test images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export import make_session
from capsbench.export import timing as rounds
from capsbench.export.cpp_runner import build_runner, read_tensors, run_runner
from capsbench.export.errors import ExportError
from capsbench.export.latency import gemm_gflops, runtime_environment, take_batch
from capsbench.export.sessions import default_threads
from capsbench.export.timing import TimeSettings
from capsbench.export.validate import PARITY_ATOL, torch_capsules
from capsbench.results import (
    LATENCY_CPP_FILE,
    LATENCY_FILE,
    Variant,
    exported_variants,
    is_trained,
    read_if_valid,
    read_result,
    sha256,
    write_json,
)
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model, not_trained_message
from capsbench.suite.env import environment
from capsbench.suite.errors import CheckpointError, StageError
from capsbench.suite.presets import RunConfig

__all__ = ["TimeSettings", "finished_latency", "time_config", "time_config_cpp", "verified_onnx"]


def finished_latency(path: Path, settings: TimeSettings, onnx_shas: dict[str, str]) -> dict | None:
    """A complete latency result (Python's or the C++ runner's) of these settings and these ONNX files."""
    res = read_if_valid(path, "latency")
    if res is None:
        return None
    same = res.get("settings") == settings.to_dict() and res.get("onnx_sha256") == onnx_shas
    # Rows from before the rounds' raw samples were kept cannot be gated on noise: time them again.
    same = same and all("round_samples_ms" in r for r in res.get("rows", []) if r.get("status") == "ok")
    return res if same and res.get("status") == "complete" else None


def onnx_shas(out: Path) -> dict[str, str]:
    """{variant: sha256 of its model.onnx} of the exported variants in a config folder."""
    return {v.name: sha256(out / v.onnx) for v in exported_variants(out)}


def verified_onnx(out: Path, variants: list[Variant]) -> dict[str, str]:
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


def _exported(cfg: RunConfig, out: Path) -> list[Variant]:
    variants = exported_variants(out)
    if not variants:
        if not is_trained(out):
            raise CheckpointError(not_trained_message(cfg, out))
        raise CheckpointError(f"{cfg.id}: no exported model in {out}; run 'capsbench export' first")
    return variants


# ---------------------------------------------------------------------------------------- Python: latency.json


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
    variants = _exported(cfg, out)
    shas = verified_onnx(out, variants)
    if not force and (done := finished_latency(out / LATENCY_FILE, settings, shas)) is not None:
        return {**done, "skipped": True}
    threads = settings.threads or default_threads()
    images = training.test_images(splits(), max(settings.batch_sizes)).numpy()
    timed, set_aside = rounds.run_rounds(
        _python_round,
        (cfg, out, settings, images, threads, progress is not None),
        settings,
        label=cfg.id,
        progress=progress,
    )
    pooled = rounds.pool(timed, set_aside, settings)
    first = timed[0]
    devices = first["torch_device"]
    gemm_cache = {} if gemm_cache is None else gemm_cache
    for device, gemm in pooled.pop("gemm").items():
        gemm_cache.setdefault(device, gemm)
    for row in pooled["rows"]:
        if row.get("gflops_per_s") is not None:
            row["gemm_fraction"] = row["gflops_per_s"] / gemm_cache[devices[row["variant"]]]["gflops_per_s"]
    result = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": "complete",
        "settings": settings.to_dict(),
        "onnx_sha256": shas,
        "sessions": first["sessions"],
        "node_placement": first["node_placement"] or None,
        "torch_device": devices,
        "flops_per_image": first["flops_per_image"],
        "gemm": gemm_cache.get(devices[variants[0].name]),
        "environment": {**environment(torch.device("cpu")), **runtime_environment()},
        **pooled,
        **({"test_ort_delay_ms": settings.ort_delay_ms} if settings.ort_delay_ms else {}),
    }
    result["rows"] = result.pop("rows")  # last, as before: the file reads top down
    write_json(out / LATENCY_FILE, "latency", result)
    return result


def _python_round(
    cfg: RunConfig, out: Path, settings: TimeSettings, images: np.ndarray, threads: int, verbose: bool
) -> rounds.Round:
    """One round of the time stage (in a fresh process): every exported variant's backends swept once."""
    say = (lambda line: print(line, flush=True)) if verbose else None
    probe_device = settings.probe_device()

    def sweep() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        facts: dict[str, dict[str, Any]] = {
            k: {} for k in ("sessions", "flops_per_image", "node_placement", "torch_device", "gemm")
        }
        for v in exported_variants(out):
            model = load_model(cfg, out / v.checkpoint)
            timed, about = rounds.sweep_model(
                out / v.onnx, model, images, settings, threads, label=f"{cfg.id} {v.name}", progress=say
            )
            rows += [{"variant": v.name, **row} for row in timed]
            facts["sessions"][v.name] = about["session"]
            facts["flops_per_image"][v.name] = about["flops_per_image"]
            facts["torch_device"][v.name] = device = about["torch_device"]
            if about["node_placement"] is not None:
                facts["node_placement"][v.name] = about["node_placement"]
            if device != probe_device and device not in facts["gemm"]:
                facts["gemm"][device] = gemm_gflops(device=device)
            del model
        return rows, facts

    return rounds.timed_round(sweep, threads=threads, probe_device=probe_device)


# --------------------------------------------------------------------------------------- C++: latency_cpp.json


def time_config_cpp(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    settings: TimeSettings,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the C++ runner on every exported model of one config -> latency_cpp.json (the rows, rounds, machine
    probe and precision of latency.json), with a parity check of its outputs against the PyTorch model's on the
    same images."""
    out = Path(out_dir)
    variants = _exported(cfg, out)
    shas = verified_onnx(out, variants)  # the files export wrote, from the checkpoints that are there
    if not force and (done := finished_latency(out / LATENCY_CPP_FILE, settings, shas)) is not None:
        return {**done, "skipped": True}
    binary = build_runner()
    threads = settings.threads or default_threads()
    images = training.test_images(splits(), max(settings.batch_sizes)).numpy()
    # The provider a Python session gets here is the one the runner is asked for: the same fallback rules.
    sessions = {v.name: make_session(out / v.onnx, settings.provider, threads) for v in variants}
    providers = {name: s.execution_provider.runner_flag for name, s in sessions.items()}
    with tempfile.TemporaryDirectory(prefix="capsbench-cpp-") as tmp:
        # The runner is a fresh process in every round already, as the Python rounds are (issue 14).
        args = (binary, out, settings, images, threads, providers, Path(tmp))
        try:
            timed, set_aside = rounds.run_rounds(
                _cpp_round, args, settings, fresh_process=False, label=f"{cfg.id} C++", progress=progress
            )
        except ExportError as e:
            raise StageError(f"{cfg.id}: {e}") from e
        outputs = {v.name: read_tensors(Path(tmp) / f"{v.name}.cbt")[0] for v in variants}
    pooled = rounds.pool(timed, set_aside, settings)
    del pooled["gemm"]  # no row of the runner has GFLOP/s to compare with it
    last = settings.batch_sizes[-1]
    batch = take_batch(images, last)
    parity = {}
    for v in variants:
        parity[v.name] = _parity(cfg, out / v.checkpoint, outputs[v.name], sessions[v.name].run(batch), batch)
    failed = [name for name, p in parity.items() if not p["passed"]]
    res = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": "complete" if not failed else "parity failed",
        "settings": settings.to_dict(),
        "onnx_sha256": shas,
        "runner": timed[-1]["runner"],
        "parity": parity,
        **pooled,
    }
    write_json(out / LATENCY_CPP_FILE, "latency", res)
    if failed:
        raise StageError(
            f"{cfg.id}: C++ runner outputs differ from PyTorch's for {', '.join(failed)} "
            f"(max abs error of capsule lengths {max(parity[n]['max_abs_err'] for n in failed):.3g} "
            f"> {PARITY_ATOL:g})"
        )
    return res


def _cpp_round(
    binary: Path,
    out: Path,
    settings: TimeSettings,
    images: np.ndarray,
    threads: int,
    providers: dict[str, str],
    outputs: Path,
) -> rounds.Round:
    """One round of the cpp stage: the runner once per exported variant (each run its own process), its
    outputs of the last batch size kept in `outputs`/<variant>.cbt."""

    def sweep() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        runner: dict[str, Any] = {}
        for v in exported_variants(out):
            result = run_runner(
                binary,
                out / v.onnx,
                settings.batch_sizes,
                threads,
                settings.warmup,
                settings.iters,
                providers[v.name],
                input=images,
                output=outputs / f"{v.name}.cbt",
                max_seconds=settings.max_seconds,
            )
            rows += [{"variant": v.name, **r} for r in result["rows"]]
            keep = ("provider", "threads", "onnxruntime", "session", "placement")
            runner[v.name] = {k: result.get(k) for k in keep}
        return rows, {"runner": runner}

    return rounds.timed_round(sweep, threads=threads, probe_device=settings.probe_device())


def _parity(
    cfg: RunConfig, checkpoint: Path, cpp_out: np.ndarray, py_out: np.ndarray, batch: np.ndarray
) -> dict[str, Any]:
    """The runner's class capsules against the PyTorch model's on the same batch (the reference is PyTorch,
    not ONNX Runtime on the same file, which agrees with any file), and whether Python ORT gave the same bits."""
    ref = torch_capsules(load_model(cfg, checkpoint).eval(), torch.from_numpy(batch))
    err = _length_error(cpp_out, ref) if cpp_out.shape == ref.shape else float("inf")
    return {
        "batch": len(batch),
        "reference": "pytorch",
        "max_abs_err": err,  # of class-capsule lengths, like export's parity
        "atol": PARITY_ATOL,
        "bitwise_equal_python_ort": bool(cpp_out.shape == py_out.shape and np.array_equal(cpp_out, py_out)),
        "passed": err <= PARITY_ATOL,
    }


def _length_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference of class-capsule lengths (the quantity export's parity bounds)."""
    lengths = [np.sqrt((a.astype(np.float64) ** 2).sum(-1)) for a in (out, ref)]
    return float(np.max(np.abs(lengths[0] - lengths[1])))

"""The export and time stages of a run: every trained (and pruned) model of a config -> model.onnx, export.json,
parity.json on real test images, then latency.json from the one timing harness (ORT, torch eager, torch.compile).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export import (
    ExportError,
    ParityError,
    export_onnx,
    graph_flops,
    load_onnx,
    make_session,
    parity,
    runtime_environment,
)
from capsbench.export import latency as harness
from capsbench.export.sessions import default_threads, node_placement
from capsbench.suite import train as training
from capsbench.suite.env import environment
from capsbench.suite.errors import CapsbenchError, CheckpointError
from capsbench.suite.presets import RunConfig
from capsbench.suite.results import read_result, write_json

LATENCY_FILE = "latency.json"
PARITY_IMAGES = 1000


class StageError(CapsbenchError):
    """An export, parity or timing failure reported by export/ (its message says what to do)."""


@dataclass(frozen=True)
class Variant:
    """One exportable model of a config and the files it produces (paths relative to the config folder)."""

    name: str
    checkpoint: str
    onnx: str
    export: str
    parity: str


BASE = Variant("model", training.CHECKPOINT_FILE, "model.onnx", "export.json", "parity.json")
PRUNED_CHECKPOINT = "pruned.pt"  # the pruning stage's final net: a smaller CapsNet with its own model_config


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present_variants(out_dir: Path) -> list[Variant]:
    """The trained net, then every pruned net: pruned.pt in the config folder, or one per pruning setting in
    its sub-folder (prune_<criterion>_b.._c../pruned.pt), whose ONNX files go into that sub-folder."""
    out = Path(out_dir)
    found = [BASE] if (out / BASE.checkpoint).is_file() else []
    if (out / PRUNED_CHECKPOINT).is_file():
        found.append(
            Variant("pruned", PRUNED_CHECKPOINT, "pruned.onnx", "export_pruned.json", "parity_pruned.json")
        )
    for ckpt in sorted(out.glob(f"*/{PRUNED_CHECKPOINT}")):
        d = ckpt.parent.name
        found.append(
            Variant(
                d, f"{d}/{PRUNED_CHECKPOINT}", f"{d}/{BASE.onnx}", f"{d}/{BASE.export}", f"{d}/{BASE.parity}"
            )
        )
    return found


def not_trained_message(cfg: RunConfig, out_dir: Path) -> str:
    return (
        f"{cfg.id}: not trained yet (no finished training in {out_dir}); "
        f"run 'capsbench train' for this config first (e.g. --configs {cfg.id})"
    )


def parity_images(splits: training.Splits, count: int = PARITY_IMAGES) -> torch.Tensor:
    """The first `count` test images as float32 in [0, 1]."""
    return splits.test_x[:count].float().div_(255.0)


# ------------------------------------------------------------------------------------------------ export


def _export_done(out: Path, v: Variant, checkpoint_sha: str) -> bool:
    try:
        info = read_result(out / v.export, "export")
        par = read_result(out / v.parity, "parity")
    except CheckpointError:
        return False
    return (
        (out / v.onnx).is_file()
        and info.get("checkpoint_sha256") == checkpoint_sha
        and par.get("checkpoint_sha256") == checkpoint_sha
        and par.get("passed") is True
    )


def export_config(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    *,
    force: bool = False,
    opset: int | None = None,
    num_parity_images: int = PARITY_IMAGES,
) -> list[dict[str, Any]]:
    """Export every model of one trained config and check parity; one row per variant.

    `splits` is called only when something must be (re)done. A failed export or parity is recorded in the
    row (and parity.json) and the next variant goes on.
    """
    out = Path(out_dir)
    if not training.is_trained(out):
        row = {"config_id": cfg.id, "label": cfg.label, "status": "not trained"}
        return [{**row, "error": not_trained_message(cfg, out)}]
    rows = []
    for v in present_variants(out):
        row: dict[str, Any] = {"config_id": cfg.id, "label": cfg.label, "variant": v.name}
        ckpt_sha = sha256(out / v.checkpoint)
        if not force and _export_done(out, v, ckpt_sha):
            info, par = read_result(out / v.export, "export"), read_result(out / v.parity, "parity")
            rows.append({**row, "status": "done", **_summary(info, par)})
            continue
        try:
            model = training.load_model(cfg, out / v.checkpoint)
            images = parity_images(splits(), num_parity_images)
            info = export_onnx(model, out / v.onnx, images[:2], opset=opset)
            info.update(config_id=cfg.id, variant=v.name, checkpoint=v.checkpoint, checkpoint_sha256=ckpt_sha)
            info["onnx_sha256"] = sha256(out / v.onnx)
            write_json(out / v.export, "export", info)
            try:
                par = parity(out / v.onnx, model, images)
                status = "exported"
            except ParityError as e:
                par = {**getattr(e, "result", {}), "passed": False, "error": str(e)}
                status = "parity failed"
            par.update(config_id=cfg.id, variant=v.name, checkpoint_sha256=ckpt_sha)
            write_json(out / v.parity, "parity", par)
            rows.append({**row, "status": status, **_summary(info, par)})
        except ExportError as e:
            rows.append({**row, "status": "export failed", "error": str(e)})
    return rows


def _summary(info: dict, par: dict) -> dict[str, Any]:
    return {
        "exporter": info.get("exporter"),
        "nodes": info.get("nodes"),
        "file_bytes": info.get("file_bytes"),
        "max_abs_err": par.get("max_abs_err"),
        "max_rel_err": par.get("max_rel_err"),
        "argmax_agreement": par.get("argmax_agreement"),
        "near_ties": par.get("near_ties"),
        "parity_images": par.get("images"),
        **({"error": par["error"]} if par.get("error") else {}),
    }


def format_export_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<11}{'variant':<24}{'status':<15}{'nodes':>6}{'MB':>7}{'max abs err':>13}{'max rel err':>13}"
        f"{'agree':>7}{'ties':>6}  label"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("nodes") is None:
            lines.append(
                f"{r['config_id']:<11}{r.get('variant', '-'):<8}{r['status']:<15}  {r.get('error', '')}"
            )
            continue
        err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "-"
        rel = f"{r['max_rel_err']:.2e}" if r.get("max_rel_err") is not None else "-"
        agree = f"{r['argmax_agreement']:.3f}" if r.get("argmax_agreement") is not None else "-"
        lines.append(
            f"{r['config_id']:<11}{r['variant']:<24}{r['status']:<15}{r['nodes']:>6}"
            f"{r['file_bytes'] / 1e6:>7.2f}{err:>13}{rel:>13}{agree:>7}{r.get('near_ties', 0):>6}  {r['label']}"
        )
        if r.get("error"):
            lines.append(f"{'':<11}{r['error']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class TimeSettings:
    batch_sizes: tuple[int, ...] = harness.DEFAULT_BATCH_SIZES
    iters: int = 50
    warmup: int = 5
    threads: int | None = None
    provider: str = "auto"
    compile: bool = False
    max_seconds: float | None = 10.0  # per backend and batch size, after at least 5 timed runs

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "batch_sizes": list(self.batch_sizes)}


def exported_variants(out: Path) -> list[Variant]:
    """The variants of a config folder that `capsbench export` has exported (what the timing stages time)."""
    return [v for v in present_variants(out) if (out / v.onnx).is_file() and (out / v.export).is_file()]


def _time_done(out: Path, settings: TimeSettings, onnx_shas: dict[str, str]) -> dict | None:
    try:
        res = read_result(out / LATENCY_FILE, "latency")
    except CheckpointError:
        return None
    same = res.get("settings") == settings.to_dict() and res.get("onnx_sha256") == onnx_shas
    same = same and all("samples_ms" in r for r in res.get("rows", []) if r.get("status") == "ok")
    return res if same and res.get("status") == "complete" else None


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
        if not training.is_trained(out):
            raise CheckpointError(not_trained_message(cfg, out))
        raise CheckpointError(f"{cfg.id}: no exported model in {out}; run 'capsbench export' first")
    for v in variants:
        if read_result(out / v.export, "export").get("checkpoint_sha256") != sha256(out / v.checkpoint):
            raise CheckpointError(
                f"{out / v.onnx}: exported from an older {v.checkpoint}; run 'capsbench export' again first"
            )
    shas = {v.name: sha256(out / v.onnx) for v in variants}
    if not force and (done := _time_done(out, settings, shas)) is not None:
        return {**done, "skipped": True}

    threads = settings.threads or default_threads()
    torch.set_num_threads(threads)  # torch and ORT get the same cores
    images = parity_images(splits(), max(settings.batch_sizes)).numpy()
    gemm_cache = {} if gemm_cache is None else gemm_cache
    rows, sessions, flops, placement, devices = [], {}, {}, {}, {}
    for v in variants:
        try:
            session = make_session(out / v.onnx, settings.provider, threads)
        except ExportError as e:
            raise StageError(str(e)) from e
        sessions[v.name] = session.info
        flops[v.name] = graph_flops(load_onnx(out / v.onnx, check=False), batch=1)["flops_per_image"]
        device = "cuda" if session.on_cuda and torch.cuda.is_available() else "cpu"
        devices[v.name] = device
        gemm = gemm_cache.get(device) or gemm_cache.setdefault(device, harness.gemm_gflops(device=device))
        model = training.load_model(cfg, out / v.checkpoint)
        backends = {f"ort_{'cuda' if session.on_cuda else 'cpu'}": harness.ort_backend(session)}
        if session.on_cuda:
            placement[v.name] = node_placement(out / v.onnx, images[:1], provider="cuda", threads=threads)
            backends["ort_cuda_graph"] = _cuda_graph_backend(out / v.onnx, threads)
        backends["torch_eager"] = harness.torch_backend(model, device)
        if settings.compile:
            backends["torch_compile"] = harness.torch_backend(model, device, compile=True)
        if progress is not None:
            progress(f"{cfg.id} {v.name}: {session.provider}, {threads} threads")
        for row in harness.sweep(
            backends,
            images,
            settings.batch_sizes,
            warmup=settings.warmup,
            iters=settings.iters,
            max_seconds=settings.max_seconds,
            flops_per_image=flops[v.name],
            progress=progress,
        ):
            if row.get("gflops_per_s") is not None:
                row["gemm_fraction"] = row["gflops_per_s"] / gemm["gflops_per_s"]
            rows.append({"variant": v.name, **row})
        del session, model, backends
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
        "rows": rows,
    }
    write_json(out / LATENCY_FILE, "latency", result)
    return result


def _cuda_graph_backend(path: Path, threads: int) -> harness.Prepare:
    """ORT on CUDA with the whole graph captured: one session per batch size (a graph has fixed shapes)."""

    def prepare(images: np.ndarray):
        return make_session(path, "cuda", threads, cuda_graph=True).runner(images)

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

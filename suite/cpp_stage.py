"""The C++ timing stage: the CMake-built ONNX Runtime runner times every exported model of a config with the
Python harness's settings and schema (latency_cpp.json), and its outputs are checked against Python ORT's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from capsbench.export import ExportError, make_session
from capsbench.export.cpp import build_runner, read_tensors, run_runner
from capsbench.export.sessions import default_threads
from capsbench.suite import export_stage
from capsbench.suite import train as training
from capsbench.suite.errors import CheckpointError
from capsbench.suite.export_stage import StageError, TimeSettings
from capsbench.suite.presets import RunConfig
from capsbench.suite.results import read_result, write_json

LATENCY_CPP_FILE = "latency_cpp.json"
PARITY_TOLERANCE = 1e-6  # bitwise on CPU with the same threads in practice; this bounds anything else


def _done(out: Path, settings: TimeSettings, shas: dict[str, str]) -> dict | None:
    try:
        res = read_result(out / LATENCY_CPP_FILE, "latency")
    except CheckpointError:
        return None
    same = res.get("settings") == settings.to_dict() and res.get("onnx_sha256") == shas
    return res if same and res.get("status") == "complete" else None


def time_config_cpp(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    settings: TimeSettings,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Run the C++ runner on every exported model of one config -> latency_cpp.json (same row schema as
    latency.json), with a parity check of its outputs against Python ORT on the same input file."""
    out = Path(out_dir)
    variants = export_stage.exported_variants(out)
    if not variants:
        raise CheckpointError(f"{cfg.id}: no exported model in {out}; run 'capsbench export' first")
    shas = {v.name: export_stage.sha256(out / v.onnx) for v in variants}
    if not force and (done := _done(out, settings, shas)) is not None:
        return {**done, "skipped": True}
    try:
        binary = build_runner()
    except ExportError as e:
        raise StageError(str(e)) from e
    threads = settings.threads or default_threads()
    images = export_stage.parity_images(splits(), max(settings.batch_sizes)).numpy()
    rows, parity, runner_info = [], {}, {}
    for v in variants:
        session = make_session(out / v.onnx, settings.provider, threads)
        provider = "cuda" if session.on_cuda else "cpu"
        with tempfile.TemporaryDirectory(prefix="capsbench-cpp-") as tmp:
            output = Path(tmp) / "outputs.cbt"
            try:
                result = run_runner(
                    binary,
                    out / v.onnx,
                    settings.batch_sizes,
                    threads,
                    settings.warmup,
                    settings.iters,
                    provider,
                    input=images,
                    output=output,
                    max_seconds=settings.max_seconds,
                )
            except ExportError as e:
                raise StageError(f"{cfg.id} {v.name}: {e}") from e
            cpp_out = read_tensors(output)[0]
        last = settings.batch_sizes[-1]
        batch = np.resize(images, (last, *images.shape[1:])) if last > len(images) else images[:last]
        py_out = session.run(np.ascontiguousarray(batch))
        diff = float(np.max(np.abs(cpp_out - py_out))) if cpp_out.shape == py_out.shape else float("inf")
        parity[v.name] = {
            "batch": last,
            "max_abs_diff": diff,
            "bitwise_equal": bool(np.array_equal(cpp_out, py_out)),
            "passed": diff <= PARITY_TOLERANCE,
        }
        runner_info[v.name] = {k: result.get(k) for k in ("provider", "threads", "onnxruntime", "session")}
        rows += [{"variant": v.name, **r} for r in result["rows"]]
        del session
    failed = [name for name, p in parity.items() if not p["passed"]]
    res = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": "complete" if not failed else "parity failed",
        "settings": settings.to_dict(),
        "onnx_sha256": shas,
        "runner": runner_info,
        "parity": parity,
        "rows": rows,
    }
    write_json(out / LATENCY_CPP_FILE, "latency", res)
    if failed:
        raise StageError(
            f"{cfg.id}: C++ runner outputs differ from Python ORT for {', '.join(failed)} "
            f"(max abs diff {max(parity[n]['max_abs_diff'] for n in failed):.3g})"
        )
    return res

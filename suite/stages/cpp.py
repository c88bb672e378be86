"""The C++ timing stage: the CMake-built ONNX Runtime runner times every exported model of a config with the
Python harness's settings and schema (latency_cpp.json), and its outputs are checked against PyTorch's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export import ExportError, make_session
from capsbench.export.cpp_runner import build_runner, read_tensors, run_runner
from capsbench.export.latency import STABILITY_RULE, pool_rounds
from capsbench.export.sessions import default_threads
from capsbench.export.validate import PARITY_ATOL, _torch_capsules
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model
from capsbench.suite.errors import CheckpointError, StageError
from capsbench.suite.presets import RunConfig
from capsbench.suite.rundir import LATENCY_CPP_FILE, exported_variants, sha256, write_json
from capsbench.suite.stages.base import Context, Stage
from capsbench.suite.stages.time import (
    TimeSettings,
    finished_latency,
    least_rounds,
    rounds_agree,
    verified_onnx,
)


def _length_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference of class-capsule lengths (the quantity export's parity bounds)."""
    lengths = [np.sqrt((a.astype(np.float64) ** 2).sum(-1)) for a in (out, ref)]
    return float(np.max(np.abs(lengths[0] - lengths[1])))


def time_config_cpp(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    settings: TimeSettings,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Run the C++ runner on every exported model of one config -> latency_cpp.json (same row schema as
    latency.json), with a parity check of its outputs against the PyTorch model's on the same images."""
    out = Path(out_dir)
    variants = exported_variants(out)
    if not variants:
        raise CheckpointError(f"{cfg.id}: no exported model in {out}; run 'capsbench export' first")
    shas = verified_onnx(out, variants)  # the files export wrote, from the checkpoints that are there
    if not force and (done := finished_latency(out / LATENCY_CPP_FILE, settings, shas)) is not None:
        return {**done, "skipped": True}
    binary = build_runner()
    threads = settings.threads or default_threads()
    images = training.test_images(splits(), max(settings.batch_sizes)).numpy()
    rows, parity, runner_info = [], {}, {}
    for v in variants:
        session = make_session(out / v.onnx, settings.provider, threads)
        provider = session.execution_provider.runner_flag
        rounds: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="capsbench-cpp-") as tmp:
            output = Path(tmp) / "outputs.cbt"
            # Each round is a fresh runner process, as the Python time stage's rounds are (issue 14).
            for _ in range(max(settings.rounds, 1)):
                if len(rounds) >= least_rounds(settings) and rounds_agree([{"rows": r} for r in rounds]):
                    break  # --min-rounds: the rounds so far agree
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
                rounds.append(result["rows"])
            cpp_out = read_tensors(output)[0]
        last = settings.batch_sizes[-1]
        batch = np.resize(images, (last, *images.shape[1:])) if last > len(images) else images[:last]
        py_out = session.run(np.ascontiguousarray(batch))
        # The reference is PyTorch's model, not ONNX Runtime on the same file (which agrees with any file).
        model = load_model(cfg, out / v.checkpoint).eval()
        ref = _torch_capsules(model, torch.from_numpy(np.ascontiguousarray(batch)), 256)
        same = cpp_out.shape == ref.shape
        err = _length_error(cpp_out, ref) if same else float("inf")
        parity[v.name] = {
            "batch": last,
            "reference": "pytorch",
            "max_abs_err": err,  # of class-capsule lengths, like export's parity
            "atol": PARITY_ATOL,
            "bitwise_equal_python_ort": bool(
                cpp_out.shape == py_out.shape and np.array_equal(cpp_out, py_out)
            ),
            "passed": err <= PARITY_ATOL,
        }
        runner_info[v.name] = {
            k: result.get(k) for k in ("provider", "threads", "onnxruntime", "session", "placement")
        }
        rows += [{"variant": v.name, **r} for r in pool_rounds(rounds)]
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
        "stability_rule": STABILITY_RULE,
        "rounds": max(r.get("rounds", 1) for r in rows) if rows else 0,
        "rows": rows,
    }
    write_json(out / LATENCY_CPP_FILE, "latency", res)
    if failed:
        raise StageError(
            f"{cfg.id}: C++ runner outputs differ from PyTorch's for {', '.join(failed)} "
            f"(max abs error of capsule lengths {max(parity[n]['max_abs_err'] for n in failed):.3g} "
            f"> {PARITY_ATOL:g})"
        )
    return res


# --------------------------------------------------------------------------------------------------- stage


def done(ctx: Context) -> bool:
    out, s = ctx.out, ctx.settings
    shas = {v.name: sha256(out / v.onnx) for v in exported_variants(out)}
    return (
        not s.force and finished_latency(out / LATENCY_CPP_FILE, s.time or TimeSettings(), shas) is not None
    )


def run(ctx: Context) -> dict:
    return time_config_cpp(
        ctx.cfg, ctx.out, ctx.splits, ctx.settings.time or TimeSettings(), force=ctx.settings.force
    )


STAGE = Stage(
    "cpp",
    run=run,
    done=done,
    help="latency from the C++ ONNX Runtime runner, its outputs checked against PyTorch's",
)

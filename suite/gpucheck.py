"""Every CUDA check in one call (scripts/gpu-check.sh): the `cuda`-marked tests, then the CUDA figures of the
`quick` preset's net (training images/s; ONNX Runtime CUDA with IOBinding and CUDA graphs against torch eager
and torch.compile, node placement, first-run time) into one JSON file. `--allow-cpu` measures the same on CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export.sessions import SHAPE_OPS, placement_by_op, placement_summary  # noqa: F401 (tests use them)

KIND = "gpu_check"
DEFAULT_BATCHES = (1, 64)
NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------- tests


def run_cuda_tests(tests: Path, timeout: float = 3600) -> dict[str, Any]:
    """`pytest -m cuda` in a child process; counts and failing test ids from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", f"--junitxml={junit}", str(tests)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = {
            "command": " ".join(cmd[1:]),
            "exit_code": res.returncode,
            "seconds": time.perf_counter() - t0,
            "output_tail": (res.stdout + res.stderr)[-4000:],
        }
        if not junit.is_file():
            return {**out, "passed": 0, "failed": 0, "skipped": 0, "failures": []}
        cases = ET.parse(junit).getroot().iter("testcase")
    failures, skipped, total = [], [], 0
    for case in cases:
        total += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(name)
        elif case.find("skipped") is not None:
            skipped.append((case.find("skipped").get("message") or "").strip())
    return {
        **out,
        "passed": total - len(failures) - len(skipped),
        "failed": len(failures),
        "skipped": len(skipped),
        "skip_reasons": sorted(set(skipped)),
        "failures": failures,
    }


# ---------------------------------------------------------------------------------------------- training


def train_figures(cfg, data_dir: Path | None, device: torch.device, images: int, epochs: int, out: Path):
    """Train the config's net with the suite's own training loop on `images` real training images for
    `epochs` epochs; the last epoch's images/s is the warm figure (the first pays for cuDNN's search)."""
    from capsbench.suite import train as training

    run_cfg = cfg.replace(epochs=epochs, train_subset=images, eval_subset=min(2000, max(images // 4, 500)))
    splits = training.load_splits(run_cfg, data_dir)
    metrics = training.train(run_cfg, out, splits, device=device, progress=False)
    model = training.load_model(run_cfg, out / training.CHECKPOINT_FILE)
    history = metrics["history"]
    return (
        model,
        splits,
        {
            "config_id": cfg.id,
            "label": cfg.label,
            "device": str(device),
            "batch_size": run_cfg.batch_size,
            "train_images": metrics["train_images"],
            "epochs": epochs,
            "train_images_per_s": history[-1]["train_images_per_s"],
            "first_epoch_images_per_s": history[0]["train_images_per_s"],
            "test_accuracy": metrics["test_accuracy"],
            "eval_images": metrics["eval_images"],
            "chance": 1 / NUM_CLASSES,
            "parameters": metrics["parameters"],
        },
    )


# ----------------------------------------------------------------------------------------------- latency


def latency_figures(
    model: torch.nn.Module,
    onnx_path: Path,
    images: torch.Tensor,
    *,
    cuda: bool,
    batches: tuple[int, ...],
    warmup: int,
    iters: int,
    compile: bool,
    max_seconds: float | None,
) -> dict[str, Any]:
    """Parity, node placement and the batch sweep of ORT (IOBinding; CUDA graphs on CUDA), torch eager and
    torch.compile, all through export/'s session factory and timing harness."""
    from capsbench.export import ParityError, make_session, parity
    from capsbench.export import latency as harness

    provider, device = ("cuda", "cuda") if cuda else ("cpu", "cpu")
    session = make_session(onnx_path, provider)
    model = model.eval().to(device)
    with harness.fp32_torch():
        try:
            par = parity(onnx_path, model, images, session=session)
        except ParityError as e:
            par = {**getattr(e, "result", {}), "passed": False, "error": str(e)}
    x = images.numpy()
    placement = placement_summary(placement_by_op(onnx_path, x[:1], provider=provider))
    # On CUDA the session's runner binds inputs and outputs to device buffers (IOBinding): no copy is timed.
    backends: dict[str, harness.Prepare] = {f"ort_{provider}": harness.ort_backend(session)}
    if cuda:  # a captured graph has fixed shapes: one session per batch size
        backends["ort_cuda_graph"] = harness.graph_backend(onnx_path, "cuda")
    backends["torch_eager"] = harness.torch_backend(model, device)
    if compile:
        backends["torch_compile"] = harness.torch_backend(model, device, compile=True)
    # torch in fp32 like ORT (use_tf32=0): the speedups compare the same arithmetic
    with harness.fp32_torch():
        rows = harness.sweep(
            backends,
            x,
            batches,
            warmup=warmup,
            iters=iters,
            max_seconds=max_seconds,
            progress=lambda line: print(line, flush=True),
        )
    return {
        "provider": session.provider,
        "session": session.info,
        "parity": {k: v for k, v in par.items() if not isinstance(v, list | np.ndarray)},
        **placement,
        "settings": {
            "batch_sizes": list(batches),
            "warmup": warmup,
            "iters": iters,
            "max_seconds": max_seconds,
            "compile": compile,
            "iobinding": cuda,
            "tf32": False,
        },
        "rows": rows,
        "table": harness.format_table(rows),
    }


# -------------------------------------------------------------------------------------------------- check


def problems_of(result: dict[str, Any]) -> list[str]:
    """What makes the check fail: failed tests, a net at chance, parity, nodes off CUDA, a backend error."""
    found = []
    tests = result.get("tests")
    if tests is not None and (tests["failed"] or tests["exit_code"] not in (0, 5)):  # 5: nothing collected
        found.append(f"cuda tests: {tests['failed']} failed (pytest exit {tests['exit_code']})")
    if result["cuda"] and tests is not None and (tests["skipped"] or not tests["passed"]):
        found.append(f"cuda tests: {tests['passed']} passed, {tests['skipped']} skipped on a CUDA machine")
    train = result["training"]
    if not train["test_accuracy"] > 2 * train["chance"]:
        found.append(f"training: test accuracy {train['test_accuracy']:.3f} is not above twice chance")
    lat = result["latency"]
    if not lat["parity"].get("passed"):
        found.append(f"parity of ONNX Runtime ({lat['provider']}) against torch failed")
    if result["cuda"] and not lat["all_compute_on_cuda"]:
        found.append(
            f"node placement: compute nodes off CUDA ({lat['ops_off_cuda']}, {lat['memcpy_nodes']} Memcpy)"
        )
    found += [
        f"{r['backend']} batch {r['batch']}: {r.get('error', '')[:200]}"
        for r in lat["rows"]
        if r.get("status") != "ok"
    ]
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu-check",
        description="Run the cuda-marked tests and measure the CUDA figures of the quick preset's net into one "
        "JSON file. Without a CUDA GPU (torch and ONNX Runtime's CUDA provider) it stops with exit 2, unless "
        "--allow-cpu, which measures the same figures on CPU and writes cuda: false.",
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON file to write")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, measure on CPU instead of failing")
    p.add_argument("--tests", type=Path, default=Path("tests"), help="the test folder for pytest -m cuda")
    p.add_argument("--skip-tests", action="store_true", help="only the figures, not pytest -m cuda")
    p.add_argument("--preset", default="quick", help="whose net is measured (default: quick)")
    p.add_argument("--config", default=None, help="config id prefix in the preset (default: its first)")
    p.add_argument("--train-images", type=int, default=25600, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (the last one is the figure)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--max-seconds", type=float, default=20.0, help="per backend and batch size")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--data-dir", type=Path, default=None, help="dataset folder (default: capsbench's)")
    return p


def pick_config(preset: str, prefix: str | None):
    from capsbench.suite.errors import ConfigError
    from capsbench.suite.presets import get_preset

    configs = get_preset(preset).configs()
    chosen = [c for c in configs if prefix is None or c.id.startswith(prefix)]
    if not chosen:
        raise ConfigError(f"no config of preset {preset} has an id starting with {prefix!r}")
    return chosen[0]


def main(argv: list[str] | None = None) -> int:
    from capsbench.export import export_onnx, runtime_environment
    from capsbench.suite.doctor import cuda_missing, diagnose
    from capsbench.suite.env import environment
    from capsbench.suite.errors import CapsbenchError
    from capsbench.suite.rundir import write_json

    args = build_parser().parse_args(argv)
    missing = cuda_missing()
    if missing and not args.allow_cpu:
        print(
            f"gpu-check: no CUDA here ({missing}); run it on a GPU machine, or pass --allow-cpu",
            file=sys.stderr,
        )
        return 2
    cuda = missing is None
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"cuda": cuda, "cuda_missing": missing}
    try:
        cfg = pick_config(args.preset, args.config)
        result["environment"] = {**environment(device), **runtime_environment()}
        result["doctor"] = diagnose(args.data_dir)
        result["tests"] = None if args.skip_tests else run_cuda_tests(args.tests)
        if result["tests"] is not None:
            t = result["tests"]
            print(
                f"cuda tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", flush=True
            )
        with tempfile.TemporaryDirectory() as tmp:
            model, splits, result["training"] = train_figures(
                cfg, args.data_dir, device, args.train_images, args.epochs, Path(tmp) / "train"
            )
            tr = result["training"]
            print(f"training: {tr['train_images_per_s']:.0f} img/s, test accuracy {tr['test_accuracy']:.3f}")
            images = splits.test_x[: max(max(args.batch_sizes), 256)].float().div_(255.0)
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model.cpu().eval(), onnx_path, images[:2])
            result["latency"] = latency_figures(
                model,
                onnx_path,
                images,
                cuda=cuda,
                batches=tuple(args.batch_sizes),
                warmup=args.warmup,
                iters=args.iters,
                compile=not args.no_compile,
                max_seconds=args.max_seconds,
            )
    except Exception as e:  # noqa: BLE001 - GPU time is rare: whatever was measured is written with the error
        result.update(
            status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:]
        )
        result["seconds"] = time.perf_counter() - t0
        write_json(args.out, KIND, result)
        print(f"gpu-check: error: {e} (what ran before is in {args.out})", file=sys.stderr)
        return e.exit_code if isinstance(e, CapsbenchError) else 1
    result["seconds"] = time.perf_counter() - t0
    result["problems"] = problems_of(result)
    result["status"] = "ok" if not result["problems"] else "problems"
    write_json(args.out, KIND, result)
    print(result["latency"]["table"])
    lat = result["latency"]
    print(f"node placement: {lat['node_placement']}; off CUDA: {lat['ops_off_cuda'] or 'none'}")
    for problem in result["problems"]:
        print(f"PROBLEM {problem}")
    print(f"gpu-check: {result['status']} ({'CUDA' if cuda else 'CPU, cuda: false'}); wrote {args.out}")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every CUDA check in one call (scripts/gpu-check.sh), one step after another, each under its own timeout and
the whole within --budget seconds (default 600): the `cuda`-marked tests; the `quick` preset's net trained
(images/s); its training step in fp32, bf16 and torch.compile's reduce-overhead; ONNX Runtime CUDA with IOBinding
and CUDA graphs against torch eager and torch.compile, with node placement; the C++ runner on CUDA (IOBinding and
CUDA graphs) beside Python ONNX Runtime; the time and cpp stages end to end on the smoke preset. One JSON file
holds every figure, every step's status and every problem. `--allow-cpu` measures the same on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.export.sessions import CUDA, SHAPE_OPS, placement_by_op, placement_summary  # noqa: F401 (tests use them)

KIND = "gpu_check"
DEFAULT_BATCHES = (1, 64)
NUM_CLASSES = 10
# Each step's own timeout in seconds (each also stops where --budget runs out). Sized for one GPU: the whole
# check then stays under 10 minutes.
STEP_TIMEOUTS = {"tests": 150, "training": 90, "train_steps": 90, "latency": 150, "cpp": 90, "stages": 180}
BUDGET_S = 600


class StepTimeout(Exception):
    """A step ran past its timeout."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """StepTimeout in this (main) thread after `seconds`: the steps that run in this process (training, timing)
    stop at their limit; the steps that run a child process also pass it as the child's timeout."""

    def ring(*_):
        raise StepTimeout(f"ran past its {seconds:.0f} s timeout")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_step(result: dict[str, Any], name: str, timeout: float, fn: Callable[[float], Any]) -> Any:
    """Run one step under its timeout; its status, seconds and any error go into result['steps'][name]. What a
    failed step returns is None: the steps after it that need it are skipped, the others still run."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "timeout_s": round(timeout, 1)}
    value = None
    if timeout < 1:
        record.update(status="skipped", error="no time left of --budget")
    else:
        try:
            with _alarm(timeout + 10):  # a child process's own timeout (the same `timeout`) ends it first
                value = fn(timeout)
        except StepTimeout as e:
            record.update(status="timeout", error=str(e))
        except Exception as e:  # noqa: BLE001 - GPU time is rare: one broken step must not cost the others
            record.update(
                status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:]
            )
    record["seconds"] = round(time.perf_counter() - t0, 2)
    result.setdefault("steps", {})[name] = record
    print(
        f"step {name}: {record['status']} ({record['seconds']:.0f} s)"
        + (f": {record.get('error')}" if record["status"] != "ok" else ""),
        flush=True,
    )
    return value


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
        elif (skip := case.find("skipped")) is not None:
            skipped.append((skip.get("message") or "").strip())
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
    """Parity, node placement and one round of the time stage's timing (export/timing.py: its precision
    policy, machine probe and sweep) of ORT (IOBinding; CUDA graphs on CUDA), torch eager and torch.compile."""
    from capsbench.export import ParityError, make_session, parity, timing
    from capsbench.export import latency as harness
    from capsbench.export.sessions import default_threads

    provider, device = ("cuda", "cuda") if cuda else ("cpu", "cpu")
    settings = timing.TimeSettings(
        batch_sizes=batches,
        iters=iters,
        warmup=warmup,
        provider=provider,
        compile=compile,
        max_seconds=max_seconds,
        rounds=1,
    )
    session = make_session(onnx_path, provider)
    model = model.eval().to(device)
    with harness.fp32_torch():
        try:
            par = parity(onnx_path, model, images, session=session)
        except ParityError as e:
            par = {**getattr(e, "result", {}), "passed": False, "error": str(e)}
    x, threads = images.numpy(), default_threads()
    say = lambda line: print(line, flush=True)  # noqa: E731
    done = timing.timed_round(
        lambda: timing.sweep_model(onnx_path, model, x, settings, threads, placement=True, progress=say),
        threads=threads,
        probe_device=device,
    )
    rows = done["rows"]
    return {
        "provider": session.provider,
        "session": done["session"],
        "parity": {k: v for k, v in par.items() if not isinstance(v, list | np.ndarray)},
        # judged against CUDA whichever provider ran (gpu-check's question): on CPU every node is off CUDA
        **placement_summary(done["placement_by_op"], CUDA),
        "settings": {**settings.to_dict(), "iobinding": cuda, "tf32": False},
        "precision": done["precision"],
        "machine_probe": timing.machine_probe([done]),
        "contention": done["contention"],
        "rows": rows,
        "table": harness.format_table(rows),
    }


# ------------------------------------------------------------------------------------------ training steps


def train_step_figures(cfg, data_dir: Path | None, device: torch.device, *, compile: bool) -> dict[str, Any]:
    """The training step of the net in fp32 and bf16 (autocast) eager, and compiled with reduce-overhead (CUDA
    graphs on CUDA), through `capsbench bench train`'s own step, under its precision policy (IEEE fp32)."""
    from capsbench.suite import trainbench

    x, y = trainbench.preloaded_batch(cfg, device, data_dir)
    variants: list[tuple[str, str, str | None]] = [("eager", "fp32", None), ("eager", "bf16", None)]
    if compile:
        variants.append(("compiled", "fp32", "reduce-overhead"))
    rows = []
    with trainbench.precision_policy(tf32=False) as policy:
        for backend, precision, mode in variants:
            row = trainbench.bench_config(
                cfg,
                x,
                y,
                backend=backend,
                device=device,
                warmup=2,
                steps=5,
                compile_mode=mode,
                precision=precision,
            )
            rows.append(row)
            if row["status"] == "ok":
                print(
                    f"train step {backend} {precision} {mode or ''}: {row['images_per_s']:.0f} img/s",
                    flush=True,
                )
    return {"batch": len(x), "precision_policy": policy, "rows": rows}


# ------------------------------------------------------------------------------------------------ C++ runner


def cpp_figures(
    onnx_path: Path,
    images: np.ndarray,
    *,
    cuda: bool,
    batches: tuple[int, ...],
    warmup: int,
    iters: int,
    max_seconds: float | None,
    timeout: float,
    python_rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The C++ runner on the same ONNX file: IOBinding and (on CUDA) CUDA graphs, each with its node placement,
    and its p50 against Python ONNX Runtime's (same provider, same binding) at each batch size."""
    from capsbench.export.cpp_runner import build_runner, run_runner

    t0 = time.perf_counter()
    binary = build_runner()
    provider = "cuda" if cuda else "cpu"
    modes = {"io_binding": {"io_binding": True}}
    if cuda:
        modes["cuda_graph"] = {"cuda_graph": True}
    python = {(r["backend"], r["batch"]): r for r in python_rows or [] if r.get("status") == "ok"}
    runs = {}
    for name, kw in modes.items():
        left = timeout - (time.perf_counter() - t0)
        res = run_runner(
            binary, onnx_path, batches, provider=provider, warmup=max(warmup, 3), iters=iters,
            input=images[: max(batches)], max_seconds=max_seconds, timeout=max(left, 1), **kw,
        )  # fmt: skip
        py_backend = f"ort_{provider}_graph" if name == "cuda_graph" else f"ort_{provider}"
        for row in res["rows"]:
            ref = python.get((py_backend, row["batch"]))
            if row.get("status") == "ok" and ref is not None:
                row["python_backend"] = py_backend
                row["cpp_over_python_p50"] = row["p50_ms"] / ref["p50_ms"]
        runs[name] = {k: res.get(k) for k in ("backend", "provider", "session", "placement", "rows")}
    return {"binary": str(binary), "provider": provider, "runs": runs}


# ----------------------------------------------------------------------------------------------- the stages


def stages_figures(
    data_dir: Path | None, *, cuda: bool, timeout: float, train_images: int = 512
) -> dict[str, Any]:
    """`capsbench all --preset smoke` for its first config with tiny training, in a child process: the time and
    cpp stages end to end (sessions, placement labels, rounds, the C++ runner's build and parity)."""
    from capsbench.suite.presets import get_preset

    cfg = get_preset("smoke").configs()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "capsbench.suite.cli", "all", "--preset", "smoke", "--configs", cfg.id]
        cmd += [
            "--runs-dir",
            tmp,
            "--epochs",
            "1",
            "--train-subset",
            str(train_images),
            "--eval-subset",
            "256",
        ]
        cmd += ["--prune", "0.25,0.25", "--finetune-epochs", "1", "--batch-sizes", "1", "8", "--iters", "10"]
        cmd += ["--rounds", "1", "--provider", "cuda" if cuda else "cpu", "--no-progress", "--skip", "report"]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        # The overrides (epochs, subsets) make another config id than the preset's: the folder with config.json.
        folders = [p.parent for p in sorted((Path(tmp) / "smoke").glob("*/config.json"))]
        folder = folders[0] if folders else Path(tmp) / "smoke" / cfg.id
        out: dict[str, Any] = {
            "command": " ".join(cmd[1:]),
            "exit_code": res.returncode,
            "seconds": time.perf_counter() - t0,
            "output_tail": (res.stdout + res.stderr)[-3000:],
            "config_id": folder.name,
        }
        for stage, name in (("time", "latency.json"), ("cpp", "latency_cpp.json")):
            path = folder / name
            if not path.is_file():
                out[stage] = None
                continue
            doc = json.loads(path.read_text())
            keep = (
                "variant",
                "backend",
                "batch",
                "status",
                "p50_ms",
                "placement_ok",
                "placement_problem",
                "error",
            )
            out[stage] = {
                "rows": [{k: r[k] for k in keep if k in r} for r in doc.get("rows", [])],
                "parity": doc.get("parity"),
                "node_placement": doc.get("node_placement"),
            }
    return out


# -------------------------------------------------------------------------------------------------- check


def problems_of(result: dict[str, Any]) -> list[str]:
    """What makes the check fail: a step that failed or ran out of time, failed tests, a net at chance, parity,
    compute off CUDA (Python or C++ ORT, or a stage's rows), a backend or training step that failed."""
    found = [
        f"step {name}: {step['status']}: {str(step.get('error', ''))[:300]}"
        for name, step in (result.get("steps") or {}).items()
        if step["status"] != "ok"
    ]
    cuda = result["cuda"]
    tests = result.get("tests")
    if tests is not None and (tests["failed"] or tests["exit_code"] not in (0, 5)):  # 5: nothing collected
        found.append(f"cuda tests: {tests['failed']} failed (pytest exit {tests['exit_code']})")
    if cuda and tests is not None and (tests["skipped"] or not tests["passed"]):
        found.append(f"cuda tests: {tests['passed']} passed, {tests['skipped']} skipped on a CUDA machine")
    train = result.get("training")
    if train is not None and not train["test_accuracy"] > 2 * train["chance"]:
        found.append(f"training: test accuracy {train['test_accuracy']:.3f} is not above twice chance")
    for row in (result.get("train_steps") or {}).get("rows", []):
        what = f"train step {row['backend']} {row['precision']}" + (
            f" {row['compile_mode']}" if "compile_mode" in row else ""
        )
        if row.get("status") != "ok":
            found.append(f"{what}: {str(row.get('error', ''))[:200]}")
        elif not math.isfinite(row.get("final_loss", math.nan)):
            found.append(f"{what}: the loss is {row.get('final_loss')}")
    lat = result.get("latency")
    if lat is not None:
        if not lat["parity"].get("passed"):
            found.append(f"parity of ONNX Runtime ({lat['provider']}) against torch failed")
        if cuda and not lat["all_compute_on_cuda"]:
            found.append(
                f"node placement: compute nodes off CUDA ({lat['ops_off_cuda']}, {lat['memcpy_nodes']} Memcpy)"
            )
        found += [
            f"{r['backend']} batch {r['batch']}: {r.get('error', '')[:200]}"
            for r in lat["rows"]
            if r.get("status") != "ok"
        ]
    for mode, run in ((result.get("cpp") or {}).get("runs") or {}).items():
        placement = run.get("placement") or {}
        if cuda and not placement.get("all_compute_on_cuda"):
            found.append(f"C++ runner {mode}: {placement.get('problem') or 'placement unknown'}")
        found += [
            f"C++ runner {mode} batch {r['batch']}: {str(r.get('error', ''))[:200]}"
            for r in run["rows"]
            if r.get("status") != "ok"
        ]
    stages = result.get("stages")
    if stages is not None:
        if stages["exit_code"] != 0:
            found.append(f"capsbench all (time and cpp stages): exit {stages['exit_code']}")
        for stage in ("time", "cpp"):
            doc = stages.get(stage)
            if doc is None:
                found.append(f"capsbench all: the {stage} stage wrote no result")
                continue
            found += [
                f"{stage} stage {r.get('variant')} {r['backend']} batch {r['batch']}: "
                + (r.get("placement_problem") or str(r.get("error", ""))[:200])
                for r in doc["rows"]
                if r.get("status") != "ok" or r.get("placement_ok") is False
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
    p.add_argument("--skip-stages", action="store_true", help="leave out `capsbench all` on the smoke preset")
    p.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help=f"seconds for the whole check (default {BUDGET_S}); each step also has its own timeout "
        f"({', '.join(f'{k} {v} s' for k, v in STEP_TIMEOUTS.items())}), scaled by --timeout-scale",
    )
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every step's timeout (slow machines)"
    )
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
    from capsbench.results import write_json
    from capsbench.suite.doctor import cuda_missing, diagnose
    from capsbench.suite.env import environment
    from capsbench.suite.errors import CapsbenchError

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
    result: dict[str, Any] = {"cuda": cuda, "cuda_missing": missing, "steps": {}}

    def left(step: str) -> float:
        return min(STEP_TIMEOUTS[step] * args.timeout_scale, args.budget - (time.perf_counter() - t0))

    try:
        cfg = pick_config(args.preset, args.config)
        result["environment"] = {**environment(device), **runtime_environment()}
        result["doctor"] = diagnose(args.data_dir)
    except Exception as e:  # noqa: BLE001 - nothing can be measured: say why, with what is known
        result.update(
            status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:]
        )
        result["seconds"] = time.perf_counter() - t0
        write_json(args.out, KIND, result)
        print(f"gpu-check: error: {e} (what ran before is in {args.out})", file=sys.stderr)
        return e.exit_code if isinstance(e, CapsbenchError) else 1

    result["tests"] = None
    if not args.skip_tests:
        result["tests"] = run_step(
            result, "tests", left("tests"), lambda t: run_cuda_tests(args.tests, timeout=t)
        )
        if (t := result["tests"]) is not None:
            print(
                f"cuda tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped", flush=True
            )
    with tempfile.TemporaryDirectory() as tmp:
        trained = run_step(
            result,
            "training",
            left("training"),
            lambda t: train_figures(
                cfg, args.data_dir, device, args.train_images, args.epochs, Path(tmp) / "train"
            ),
        )
        result["training"] = trained[2] if trained else None
        if trained:
            tr = result["training"]
            print(f"training: {tr['train_images_per_s']:.0f} img/s, test accuracy {tr['test_accuracy']:.3f}")
        result["train_steps"] = run_step(
            result,
            "train_steps",
            left("train_steps"),
            lambda t: train_step_figures(cfg, args.data_dir, device, compile=not args.no_compile),
        )
        result["latency"] = result["cpp"] = None
        if trained:
            model, splits, _ = trained
            images = splits.test_x[: max(max(args.batch_sizes), 256)].float().div_(255.0)
            onnx_path = Path(tmp) / "model.onnx"

            def latency(_t: float) -> dict[str, Any]:
                export_onnx(model.cpu().eval(), onnx_path, images[:2])
                return latency_figures(
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

            result["latency"] = run_step(result, "latency", left("latency"), latency)
            if onnx_path.is_file():
                result["cpp"] = run_step(
                    result,
                    "cpp",
                    left("cpp"),
                    lambda t: cpp_figures(
                        onnx_path,
                        images.numpy(),
                        cuda=cuda,
                        batches=tuple(args.batch_sizes),
                        warmup=args.warmup,
                        iters=args.iters,
                        max_seconds=args.max_seconds,
                        timeout=t,
                        python_rows=(result["latency"] or {}).get("rows"),
                    ),
                )
        for name in ("latency", "cpp"):
            if name not in result["steps"]:
                result["steps"][name] = {
                    "status": "skipped",
                    "error": "no trained model or ONNX file to time",
                }
    result["stages"] = None
    if not args.skip_stages:
        result["stages"] = run_step(
            result, "stages", left("stages"), lambda t: stages_figures(args.data_dir, cuda=cuda, timeout=t)
        )
    result["seconds"] = time.perf_counter() - t0
    result["problems"] = problems_of(result)
    result["status"] = "ok" if not result["problems"] else "problems"
    write_json(args.out, KIND, result)
    lat = result["latency"]
    if lat is not None:
        print(lat["table"])
        print(f"node placement: {lat['node_placement']}; off CUDA: {lat['ops_off_cuda'] or 'none'}")
    for problem in result["problems"]:
        print(f"PROBLEM {problem}")
    print(
        f"gpu-check: {result['status']} ({'CUDA' if cuda else 'CPU, cuda: false'}) in {result['seconds']:.0f} s; "
        f"wrote {args.out}"
    )
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""scripts/gpu-check.sh: without CUDA one clear line and a non-zero exit; with --allow-cpu the same JSON on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsbench.export import export_onnx
from capsbench.export.sessions import CPU, node_placement
from capsbench.models import CapsNetConfig, build_capsnet
from capsbench.suite import gpucheck
from capsbench.suite.doctor import cuda_missing
from capsbench.suite.gpucheck import SHAPE_OPS, placement_by_op, placement_summary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
no_cuda = pytest.mark.skipif(cuda_missing() is None, reason="checks gpu-check on a machine without CUDA")


def gpu_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@no_cuda
@pytest.mark.slow
def test_gpu_check_without_cuda_fails_in_one_line_and_writes_nothing(tmp_path):
    res = gpu_check("--out", str(tmp_path / "g.json"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA here" in lines[0] and "--allow-cpu" in lines[0]
    assert not (tmp_path / "g.json").exists()


@no_cuda
@pytest.mark.slow
def test_gpu_check_allow_cpu_writes_the_cpu_figures(tmp_path, fashion_data_dir):
    out = tmp_path / "gpu-check.json"
    res = gpu_check(
        "--allow-cpu",
        "--out", str(out),
        "--data-dir", str(fashion_data_dir),
        "--tests", str(ROOT / "tests" / "export" / "test_cuda.py"),
        "--train-images", "2048",
        "--batch-sizes", "1", "4",
        "--warmup", "2", "--iters", "5", "--max-seconds", "2",
        "--no-compile", "--timeout-scale", "10", "--budget", "3000",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["schema_version"] == 1 and r["kind"] == "gpu_check" and r["status"] == "ok"
    assert r["cuda"] is False and "no CUDA device" in r["cuda_missing"]
    # The cuda tests ran and skipped with the one reason; none failed.
    assert r["tests"]["skipped"] == 4 and r["tests"]["failed"] == 0 and r["tests"]["passed"] == 0
    assert all(reason.startswith("needs CUDA:") for reason in r["tests"]["skip_reasons"])
    # The quick preset's first net trained on CPU past chance.
    from capsbench.suite.presets import get_preset

    t = r["training"]
    first = get_preset("quick").configs()[0]
    assert t["device"] == "cpu" and t["label"] == first.label and t["train_images"] == 2048
    assert t["train_images_per_s"] > 0 and t["test_accuracy"] > 2 * t["chance"]
    lat = r["latency"]
    assert lat["provider"] == CPU and lat["parity"]["passed"] is True
    assert set(lat["node_placement"]) == {CPU} and lat["all_nodes_on_cuda"] is False
    rows = {(row["backend"], row["batch"]): row for row in lat["rows"]}
    assert set(rows) == {(b, n) for b in ("ort_cpu", "torch_eager") for n in (1, 4)}
    assert all(row["status"] == "ok" and row["first_run_ms"] > 0 for row in rows.values())
    # one round of the time stage's procedure: its precision policy and its machine probe at start and end
    assert lat["precision"]["torch_tf32"] is False and lat["settings"]["rounds"] == 1
    assert len(lat["machine_probe"]["round_p50_ms"][0]) == 2 and lat["machine_probe"]["gflops_per_s"] > 0
    assert r["doctor"]["will_use"]["ort_provider"] == CPU
    # Every step ran within its timeout.
    assert {k: v["status"] for k, v in r["steps"].items()} == dict.fromkeys(
        ("tests", "training", "train_steps", "latency", "cpp", "stages"), "ok"
    )
    # The training step in fp32 and bf16 (reduce-overhead left out with --no-compile), under IEEE fp32.
    ts = r["train_steps"]
    assert [(row["backend"], row["precision"], row["status"]) for row in ts["rows"]] == [
        ("eager", "fp32", "ok"),
        ("eager", "bf16", "ok"),
    ]
    assert ts["precision_policy"]["torch_tf32"] is False and all(
        row["images_per_s"] > 0 for row in ts["rows"]
    )
    # The C++ runner with IOBinding (no CUDA graphs on CPU), every node on its provider, beside Python ORT.
    (run,) = r["cpp"]["runs"].values()
    assert (
        run["backend"] == "ort_cpp_cpu"
        and run["session"]["io_binding"]
        and run["placement"]["problem"] is None
    )
    assert [(row["batch"], row["status"]) for row in run["rows"]] == [(1, "ok"), (4, "ok")]
    assert all(row["cpp_over_python_p50"] > 0 for row in run["rows"])
    # The time and cpp stages end to end on the smoke preset's first config.
    st = r["stages"]
    assert st["exit_code"] == 0 and st["time"]["rows"] and st["cpp"]["rows"]
    assert all(
        row["status"] == "ok" and "placement_ok" not in row for row in st["time"]["rows"] + st["cpp"]["rows"]
    )


@pytest.mark.slow
def test_placement_by_op_counts_the_same_kernels_as_node_placement(tmp_path):
    torch.manual_seed(0)
    model = build_capsnet(
        CapsNetConfig(backbone="sahu", backbone_channels=(8, 16, 32), primary_types=8, primary_dim=8)
    ).eval()
    path = tmp_path / "m.onnx"
    x = torch.rand(2, 1, 28, 28)
    export_onnx(model, path, x)
    by_op = placement_by_op(path, x[:1].numpy(), provider="cpu")
    assert {p: sum(ops.values()) for p, ops in by_op.items()} == node_placement(
        path, x[:1].numpy(), provider="cpu"
    )
    assert "Conv" in by_op[CPU]
    s = placement_summary(by_op)
    # On CPU every kernel is off CUDA, convolutions included: not "compute on CUDA" whatever the shape ops.
    assert s["ops_off_cuda"] == by_op[CPU] and not s["all_compute_on_cuda"] and not s["all_nodes_on_cuda"]
    assert "Conv" not in SHAPE_OPS


def test_gpu_check_writes_what_it_has_when_a_step_fails(tmp_path, capsys):
    out = tmp_path / "g.json"
    code = gpucheck.main(["--allow-cpu", "--skip-tests", "--config", "no-such-id", "--out", str(out)])
    assert code == 2
    r = json.loads(out.read_text())
    assert r["kind"] == "gpu_check" and r["status"] == "error" and "no-such-id" in r["error"]
    assert r["cuda"] is (cuda_missing() is None)
    assert "no-such-id" in capsys.readouterr().err


def test_a_cuda_run_is_not_ok_when_its_tests_skipped_or_compute_left_cuda():
    def result(cuda: bool, skipped: int, off_cuda: bool) -> dict:
        return {
            "cuda": cuda,
            "tests": {"passed": 4 - skipped, "failed": 0, "skipped": skipped, "exit_code": 0},
            "training": {"test_accuracy": 0.8, "chance": 0.1},
            "latency": {
                "provider": "CUDAExecutionProvider" if cuda else CPU,
                "parity": {"passed": True},
                "all_compute_on_cuda": not off_cuda,
                "ops_off_cuda": {"Conv": 3} if off_cuda else {},
                "memcpy_nodes": 2 if off_cuda else 0,
                "rows": [{"backend": "ort_cuda", "batch": 1, "status": "ok"}],
            },
        }

    assert gpucheck.problems_of(result(cuda=True, skipped=0, off_cuda=False)) == []
    assert gpucheck.problems_of(result(cuda=False, skipped=4, off_cuda=True)) == []  # --allow-cpu on CPU
    (skip,) = gpucheck.problems_of(result(cuda=True, skipped=4, off_cuda=False))
    assert "4 skipped on a CUDA machine" in skip
    (placement,) = gpucheck.problems_of(result(cuda=True, skipped=0, off_cuda=True))
    assert "Conv" in placement and "2 Memcpy" in placement


@pytest.mark.slow
def test_each_step_runs_under_its_own_timeout_and_a_failed_step_is_a_problem():
    import time as _time

    result = {"cuda": True}
    assert gpucheck.run_step(result, "fine", 5, lambda t: t * 2) == 10
    finished: list[int] = []
    # stopped by its 1 s alarm inside the sleep: the step never gets to its end (and its status says timeout)
    assert gpucheck.run_step(result, "stuck", 1, lambda t: (_time.sleep(60), finished.append(1))) is None
    assert finished == []
    assert gpucheck.run_step(result, "broken", 5, lambda t: 1 / 0) is None
    assert gpucheck.run_step(result, "late", 0.2, lambda t: 1) is None  # no time left of the budget
    steps = result["steps"]
    assert [steps[k]["status"] for k in ("fine", "stuck", "broken", "late")] == [
        "ok",
        "timeout",
        "error",
        "skipped",
    ]
    assert "ZeroDivisionError" in steps["broken"]["error"] and "timeout" in steps["stuck"]["error"]
    problems = gpucheck.problems_of(result)
    assert [p.split(":")[0] for p in problems] == ["step stuck", "step broken", "step late"]


def test_cpp_runner_and_stage_rows_off_cuda_are_problems_on_a_cuda_machine():
    problem = "compute nodes off CUDAExecutionProvider: Softmax x2"
    cpp_row = {"batch": 1, "status": "ok", "placement_ok": False, "placement_problem": problem}
    result = {
        "cuda": True,
        "cpp": {
            "runs": {
                "io_binding": {
                    "placement": {"all_compute_on_cuda": False, "problem": problem},
                    "rows": [cpp_row],
                },
                "cuda_graph": {
                    "placement": {"all_compute_on_cuda": True},
                    "rows": [{"batch": 1, "status": "error", "error": "OrtException: capture"}],
                },
            }
        },
        "stages": {
            "exit_code": 0,
            "time": {
                "rows": [
                    {
                        "variant": "trained",
                        "backend": "ort_cuda",
                        "batch": 8,
                        "status": "ok",
                        "placement_ok": False,
                        "placement_problem": problem,
                    }
                ]
            },
            "cpp": None,
        },
        "train_steps": {
            "rows": [{"backend": "eager", "precision": "bf16", "status": "ok", "final_loss": float("nan")}]
        },
    }
    assert gpucheck.problems_of(result) == [
        "train step eager bf16: the loss is nan",
        f"C++ runner io_binding: {problem}",
        "C++ runner cuda_graph batch 1: OrtException: capture",
        f"time stage trained ort_cuda batch 8: {problem}",
        "capsbench all: the cpp stage wrote no result",
    ]
    result["cuda"] = False  # --allow-cpu: the CPU placement is not judged against CUDA
    assert f"C++ runner io_binding: {problem}" not in gpucheck.problems_of(result)

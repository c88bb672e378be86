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
        "--no-compile",
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
    assert r["doctor"]["will_use"]["ort_provider"] == CPU


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

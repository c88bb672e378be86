"""The C++ runner: built once per session (provisioning ONNX Runtime's headers on demand, cached across
sessions), its CTest suite, the harness's JSON schema, and parity with Python ONNX Runtime on real images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from capsbench.export import export_onnx
from capsbench.export.cpp_runner import (
    BuildError,
    RunnerError,
    build_runner,
    read_tensor,
    read_tensors,
    run_ctest,
    run_runner,
    tensor_record,
    write_tensor,
)
from capsbench.export.latency import summarize
from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.suite import data

THREADS = 2
# A smoke-size net with one intermediate capsule layer: every op kind of the real nets, small enough to be fast.
# caps_init pinned like tests/export/conftest.py: ten Adam steps at this scale give a net that has learned.
CONFIG = CapsNetConfig(
    backbone="sahu",
    backbone_channels=(16, 32, 64),
    primary_types=8,
    primary_dim=8,
    intermediate=((8, 8),),
    caps_init="fan_in",
)


@pytest.fixture(scope="session")
def runner() -> Path:
    """The built runner. Without cmake or a compiler the tests skip locally but fail in CI ($CI set)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if (shutil.which("cmake") is None or compiler is None) and not os.environ.get("CI"):
        pytest.skip("the C++ runner needs cmake and a C++17 compiler (apt-get install cmake g++)")
    return build_runner()


@pytest.fixture(scope="session")
def fashion_test(fashion_data_dir) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST test images as float32 in [0, 1] (N, 1, 28, 28), with labels."""
    images, labels = data.load_split("fashion-mnist", "test", fashion_data_dir)
    return (images[:256].numpy().astype(np.float32) / 255), labels[:256].numpy()


@pytest.fixture(scope="session")
def capsnet_onnx(tmp_path_factory, fashion_data_dir) -> Path:
    """A briefly trained small CapsNet (so capsule lengths are far from zero), exported with its lengths."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    x, y = data.load_split("fashion-mnist", "train", fashion_data_dir)
    x, y = x[:640].float() / 255, y[:640]
    model = build_capsnet(CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for i in range(10):
        loss = margin_loss(CapsNet.lengths(model(x[i * 64 : (i + 1) * 64])), y[i * 64 : (i + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("cpp") / "model.onnx"
    export_onnx(model.eval(), path, x[:2], with_lengths=True)
    return path


def python_ort(path: Path, images: np.ndarray) -> list[np.ndarray]:
    """Python ONNX Runtime with the runner's settings: same threads, ORT_ENABLE_ALL, sequential."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


# ------------------------------------------------------------------------------------------- tensor files


def test_tensor_files_round_trip_every_dtype_and_several_records(tmp_path):
    arrays = [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.array([[1, 2]], dtype=np.int64),
        np.array(3.5, dtype=np.float64),
        np.zeros((0, 4), dtype=np.uint8),
        np.array([True, False]),
        np.ones((2, 2), dtype=np.float16),
    ]
    path = write_tensor(tmp_path / "one.cbt", arrays[0][:, ::2])  # non-contiguous input is fine
    np.testing.assert_array_equal(read_tensor(path), arrays[0][:, ::2])
    (tmp_path / "many.cbt").write_bytes(b"".join(tensor_record(a) for a in arrays))
    for got, want in zip(read_tensors(tmp_path / "many.cbt"), arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_tensor_file_header_is_the_documented_layout(tmp_path):
    raw = tensor_record(np.array([[1.0, 2.0]], dtype=np.float32))
    assert raw[:4] == b"CBT1"
    assert np.frombuffer(raw[4:12], "<u4").tolist() == [1, 2]  # float32 (ONNX code 1), 2 dims
    assert np.frombuffer(raw[12:28], "<i8").tolist() == [1, 2]
    assert np.frombuffer(raw[28:], "<f4").tolist() == [1.0, 2.0]


def test_corrupt_tensor_files_are_refused_with_the_file_name(tmp_path):
    bad = tmp_path / "bad.cbt"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="bad.cbt: not a CBT1"):
        read_tensor(bad)
    bad.write_bytes(tensor_record(np.ones((4, 4), np.float32))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_tensor(bad)


# ------------------------------------------------------------------------------------------------ runner


def test_missing_build_tools_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(
        BuildError, match="needs cmake and a C\\+\\+17 compiler: apt-get install cmake g\\+\\+"
    ):
        build_runner(build_dir=tmp_path / "build")


def test_second_build_is_cached_and_not_rebuilt(runner):
    said, built = [], runner.stat().st_mtime_ns
    assert build_runner(progress=said.append) == runner
    assert (
        said == [] and runner.stat().st_mtime_ns == built
    )  # no cmake step ran: the finished build was reused


def test_ctest_suite_of_the_runner_passes(runner):
    out = run_ctest(runner.parent)
    assert "100% tests passed" in out
    assert "runner.input_wrong_shape" in out  # the model-based tests ran, not only the argument checks


def test_runner_json_has_the_python_harness_schema(runner, capsnet_onnx, fashion_test):
    res = run_runner(
        runner, capsnet_onnx, [1, 8], threads=THREADS, warmup=2, iters=5, input=fashion_test[0][:4]
    )
    harness_keys = set(summarize([0.001, 0.002], batch=1, first_s=0.003))
    assert [r["batch"] for r in res["rows"]] == [1, 8]
    for row in res["rows"]:
        assert harness_keys <= set(row), harness_keys - set(row)
        assert row["status"] == "ok" and row["backend"] == "ort_cpp_cpu" and row["iters"] == 5
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["throughput_ips"] == pytest.approx(row["batch"] / (row["p50_ms"] / 1e3))
        # the raw timed runs come back, and the spread and stability are the Python summariser's
        assert len(row["samples_ms"]) == 5 and row["n"] == 5
        assert row["p50_ms"] == pytest.approx(float(np.median(row["samples_ms"])))
        assert row["iqr_rel"] >= 0 and isinstance(row["stable"], bool)
    assert res["provider"] == res["session"]["provider"] == "CPUExecutionProvider"
    assert res["threads"] == THREADS and res["session"]["opt_level"] == "all"
    assert res["onnxruntime"] == ort.__version__  # the very runtime the Python harness uses
    assert res["input"]["shape"] == [4, 1, 28, 28]
    assert res["output_names"] == ["capsules", "lengths"]


def test_runner_outputs_equal_python_ort_on_real_fashion_mnist(runner, capsnet_onnx, fashion_test, tmp_path):
    images, labels = fashion_test[0][:64], fashion_test[1][:64]
    want = python_ort(capsnet_onnx, images)
    for io_binding in (False, True):
        out = tmp_path / f"out-{io_binding}.cbt"
        write_tensor(tmp_path / "images.cbt", images)
        run_runner(
            runner,
            capsnet_onnx,
            [64],
            threads=THREADS,
            warmup=1,
            iters=2,
            input=tmp_path / "images.cbt",
            output=out,
            io_binding=io_binding,
        )
        got = read_tensors(out)
        assert [g.shape for g in got] == [(64, 10, 16), (64, 10)]
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            # The same library with the same threads, optimisation level and graph on the same CPU: bitwise.
            np.testing.assert_array_equal(g, w)
    lengths = got[1]
    assert lengths.max() > 0.3  # a trained net: the comparison is not between near-zero numbers
    assert (lengths.argmax(1) == labels).mean() > 0.3  # and it has learned something real


def test_runner_batches_take_the_first_rows_cycling(runner, capsnet_onnx, fashion_test, tmp_path):
    images = fashion_test[0][:5]
    run_runner(
        runner, capsnet_onnx, [8], threads=THREADS, warmup=1, iters=1, input=images, output=tmp_path / "o"
    )
    want = python_ort(capsnet_onnx, images[np.arange(8) % 5])
    np.testing.assert_array_equal(read_tensors(tmp_path / "o")[1], want[1])


def test_runner_refuses_images_of_the_wrong_size(runner, capsnet_onnx):
    with pytest.raises(RunnerError, match=r"bad input.*\(2, 1, 27, 28\) float32 does not fit") as e:
        run_runner(runner, capsnet_onnx, input=np.zeros((2, 1, 27, 28), np.float32))
    assert e.value.returncode == 4
    with pytest.raises(RunnerError, match="float64 does not fit") as e:
        run_runner(runner, capsnet_onnx, input=np.zeros((2, 1, 28, 28), np.float64))


def test_runner_missing_or_corrupt_model_is_a_clear_error(runner, tmp_path):
    with pytest.raises(RunnerError, match="model file not found") as e:
        run_runner(runner, tmp_path / "nothing.onnx")
    assert e.value.returncode == 3
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 10)
    with pytest.raises(RunnerError, match="ONNX Runtime cannot load it") as e:
        run_runner(runner, tmp_path / "junk.onnx")
    assert e.value.returncode == 3


def test_a_failing_batch_size_is_an_error_row_and_the_others_are_timed(runner, tmp_path):
    # Declares a dynamic batch axis but reshapes to a fixed (2, 16): batch 3 fails inside ONNX Runtime.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 16])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    res = run_runner(runner, tmp_path / "m.onnx", [2, 3, 2], warmup=1, iters=2)
    assert [r["status"] for r in res["rows"]] == ["ok", "error", "ok"]
    assert res["rows"][1]["error"].startswith("OrtException: ") and "p50_ms" not in res["rows"][1]
    assert "batch 3" in res["stderr"]


def test_cuda_is_used_when_present_and_refused_clearly_otherwise(runner, capsnet_onnx):
    has_gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if not has_gpu:
        with pytest.raises(RunnerError, match="provider unavailable.*--provider cuda") as e:
            run_runner(runner, capsnet_onnx, provider="cuda", iters=1)
        assert e.value.returncode == 5
        return
    res = run_runner(runner, capsnet_onnx, [1, 8], provider="cuda", warmup=3, iters=5)
    assert res["provider"] == "CUDAExecutionProvider" and res["session"]["io_binding"]
    assert all(r["status"] == "ok" for r in res["rows"])

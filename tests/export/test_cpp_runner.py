"""The C++ runner: built once per session (provisioning ONNX Runtime's headers on demand, cached across
sessions), its CTest suite, the harness's JSON schema, and parity with Python ONNX Runtime on real images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from capsbench.export import export_onnx
from capsbench.export.cpp_runner import (
    CPP_DIR,
    BuildError,
    RunnerError,
    build_runner,
    label_placement,
    provision_ort,
    read_tensor,
    read_tensors,
    run_ctest,
    run_runner,
    tensor_record,
    write_tensor,
)
from capsbench.export.latency import summarize
from capsbench.export.sessions import CPU, CUDA
from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.suite import data
from capsbench.suite.doctor import cuda_missing

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


def _need_build_tools() -> None:
    """Without cmake or a compiler the runner's tests skip locally but fail in CI ($CI set)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if (shutil.which("cmake") is None or compiler is None) and not os.environ.get("CI"):
        pytest.skip("the C++ runner needs cmake and a C++17 compiler (apt-get install cmake g++)")


@pytest.fixture(scope="session")
def runner() -> Path:
    """The built runner."""
    _need_build_tools()
    return build_runner()


# AddressSanitizer's options for the runner's IOBinding test. ONNX Runtime is not instrumented, so a value it
# frees through an allocator the runner already deleted reads freed memory where ASan does not look; filling
# freed memory (max_free_fill_size, with ASan's free_fill_byte 0x55) turns that stale read into a wild pointer
# and a SEGV that ASan reports with the runner's frames (~Bench). Leak checking stays on: on the CPU this
# runtime frees everything it allocates (measured: no report with the defaults), so a leaked value or binding
# is an error too.
ASAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:max_free_fill_size=1048576:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


@pytest.fixture(scope="session")
def asan_runner() -> Path:
    """The runner built with -DCAPSBENCH_ASAN=ON (AddressSanitizer, UndefinedBehaviorSanitizer), cached apart."""
    _need_build_tools()
    return build_runner(asan=True)


def sanitized_run(binary: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **ASAN_ENV}
    )


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


def test_the_runner_reports_raw_samples_only_and_python_computes_every_statistic(
    runner, capsnet_onnx, tmp_path
):
    out = tmp_path / "runner.json"
    cmd = [str(runner), "--model", str(capsnet_onnx), "--batch", "1,4", "--warmup", "1", "--iters", "6"]
    subprocess.run([*cmd, "--threads", str(THREADS), "--json", str(out)], check=True, capture_output=True)
    for row in json.loads(out.read_text())["rows"]:
        # no percentile of its own that Python would discard: one summariser computes them for every backend
        assert not {
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "mean_ms",
            "std_ms",
            "min_ms",
            "max_ms",
            "throughput_ips",
        } & set(row)
        assert len(row["samples_ms"]) == row["iters"] == 6 and all(x > 0 for x in row["samples_ms"])
        assert row["first_run_ms"] > 0


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


# ------------------------------------------------------------------------------------- placement (issue 22)


def test_runner_records_where_every_node_ran(runner, tmp_path):
    """A graph of known nodes, unoptimised: the runner's profiled run finds each one on the CPU provider."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["m"]),
        helper.make_node("Softmax", ["m"], ["s"], axis=-1),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [two])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        tmp_path / "m.onnx",
    )
    res = run_runner(runner, tmp_path / "m.onnx", [2, 5], warmup=1, iters=2, opt_level="disable")
    session = res["session"]
    assert session["placement"] == {CPU: {"Relu": 2, "Mul": 1, "Softmax": 1}}
    assert session["providers_used"] == [CPU] and session["fallback"] is None
    assert session["placement_batch"] == 2 and session["placement_error"] is None
    assert res["placement"]["all_compute_on_provider"] and res["placement"]["problem"] is None
    assert all(
        "placement_ok" not in r for r in res["rows"]
    )  # rows are marked only when something ran elsewhere
    assert not list(tmp_path.glob("*.json"))  # the profile went to a temporary folder, and was removed


def test_rows_whose_compute_ran_off_the_requested_provider_are_marked_like_python_rows():
    """Labelling of a runner result asked for CUDA whose profile (as the runner writes it) shows a Softmax on
    the CPU and a Memcpy: the same problem line as the Python time stage's, on every row."""
    rows = [{"backend": "ort_cpp_cuda", "batch": 1, "status": "ok"}, {"backend": "ort_cpp_cuda", "batch": 8}]
    session = {
        "provider": CUDA,
        "requested": "cuda",
        "placement": {CUDA: {"Conv": 3, "MemcpyToHost": 1}, CPU: {"Softmax": 2, "Shape": 1}},
    }
    res = label_placement({"provider": CUDA, "session": session, "rows": rows})
    problem = f"compute nodes off {CUDA}: Softmax x2; 1 Memcpy node(s) moved data between devices"
    assert res["placement"]["problem"] == problem and not res["placement"]["all_compute_on_cuda"]
    assert [(r["placement_ok"], r["placement_problem"]) for r in res["rows"]] == [(False, problem)] * 2
    # Shape arithmetic left on the CPU is fine; an unknown placement off the CPU is not.
    session["placement"] = {CUDA: {"Conv": 3}, CPU: {"Shape": 1}}
    assert all("placement_ok" not in r for r in label_placement({"session": session, "rows": rows})["rows"])
    unknown = label_placement(
        {"session": {**session, "placement": None, "placement_error": "OrtException: x"}, "rows": rows}
    )
    assert (
        unknown["placement"] is None
        and unknown["rows"][0]["placement_problem"] == "placement unknown: OrtException: x"
    )


# ------------------------------------------------------------------------------ IOBinding under AddressSanitizer


def test_io_binding_path_is_clean_under_address_sanitizer(asan_runner, capsnet_onnx, fashion_test, tmp_path):
    """Three batch sizes with IOBinding: each one's buffers (from the session's allocator, as on CUDA) are freed
    before the next is prepared and at exit. A value freed through a deleted allocator, an overflow of a bound
    buffer or a leak would stop the run with a sanitizer report; the outputs are still Python ORT's, bitwise."""
    images = fashion_test[0][:8]
    write_tensor(tmp_path / "images.cbt", images)
    args = ["--model", str(capsnet_onnx), "--input", str(tmp_path / "images.cbt"), "--batch", "8,1,3"]
    args += ["--io-binding", "--warmup", "2", "--iters", "3", "--threads", str(THREADS)]
    res = sanitized_run(
        asan_runner, *args, "--output", str(tmp_path / "out.cbt"), "--json", str(tmp_path / "r.json")
    )
    report = f"exit {res.returncode}\n{res.stderr[-6000:]}"
    assert res.returncode == 0, report
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        assert marker not in res.stderr, report
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["session"]["io_binding"] and [r["status"] for r in result["rows"]] == ["ok"] * 3
    got, want = read_tensors(tmp_path / "out.cbt"), python_ort(capsnet_onnx, images[:3])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.slow
def test_address_sanitizer_catches_the_allocator_dying_before_its_values(capsnet_onnx, tmp_path):
    """The check above can fail: the runner with issue 22's bug put back (the allocator declared after the values,
    so destroyed first) is built with the sanitizers and run the same way; ASan stops it in ~Bench."""
    _need_build_tools()
    src = tmp_path / "src"
    shutil.copytree(CPP_DIR, src)
    text = (src / "runner.cpp").read_text()
    fixed = "  std::unique_ptr<Ort::Allocator> allocator_;\n  std::vector<Ort::Value> values_, last_;\n"
    assert fixed in text, "runner.cpp's Bench members changed: update this test"
    broken = "  std::vector<Ort::Value> values_, last_;\n  std::unique_ptr<Ort::Allocator> allocator_;\n"
    (src / "runner.cpp").write_text(text.replace(fixed, broken))
    build = tmp_path / "build"
    cmake = ["cmake", "-S", str(src), "-B", str(build), f"-DONNXRUNTIME_ROOT={provision_ort()}"]
    cmake += ["-DCAPSBENCH_ASAN=ON", "-DBUILD_TESTING=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    for cmd in (cmake, ["cmake", "--build", str(build), "--parallel", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = sanitized_run(
        build / "capsbench-runner",
        "--model",
        str(capsnet_onnx),
        "--batch",
        "1,2",
        "--io-binding",
        "--warmup",
        "1",
        "--iters",
        "2",
    )
    assert res.returncode != 0 and "ERROR: AddressSanitizer" in res.stderr, res.stderr[-4000:]
    assert re.search(r"in ~Bench .*runner\.cpp", res.stderr), res.stderr[-4000:]


# ------------------------------------------------------------------------------------------------------ CUDA

CUDA_MISSING = cuda_missing()
# The one skip reason of tests/export/test_cuda.py; gpu-check runs these with pytest -m cuda.
without_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs CUDA: {CUDA_MISSING}")


@pytest.mark.skipif(CUDA_MISSING is None, reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_clearly_without_a_gpu(runner, capsnet_onnx):
    with pytest.raises(RunnerError, match="provider unavailable.*--provider cuda") as e:
        run_runner(runner, capsnet_onnx, provider="cuda", iters=1)
    assert e.value.returncode == 5


def _outputs_match(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4)  # cuDNN's kernels against the CPU's, in fp32 (TF32 off)


@pytest.mark.cuda
@without_cuda
def test_cuda_io_binding_runs_on_the_device_with_every_node_on_cuda(
    runner, capsnet_onnx, fashion_test, tmp_path
):
    images, batches = fashion_test[0][:8], [1, 8, 3]
    res = run_runner(
        runner,
        capsnet_onnx,
        batches,
        provider="cuda",
        io_binding=True,
        warmup=3,
        iters=5,
        input=images,
        output=tmp_path / "o.cbt",
    )
    assert res["provider"] == CUDA and res["session"]["io_binding"] and not res["session"]["cuda_graph"]
    assert [r["status"] for r in res["rows"]] == ["ok"] * len(batches)
    assert res["session"]["providers_used"][0] == CUDA and res["session"]["fallback"] is None
    assert res["placement"]["all_compute_on_cuda"], res["placement"]["problem"]
    assert all("placement_ok" not in r for r in res["rows"])
    _outputs_match(read_tensors(tmp_path / "o.cbt"), python_ort(capsnet_onnx, images[: batches[-1]]))


@pytest.mark.cuda
@without_cuda
def test_cuda_graph_replays_every_batch_size_and_gives_the_cpu_outputs(
    runner, capsnet_onnx, fashion_test, tmp_path
):
    images = fashion_test[0][:8]
    res = run_runner(
        runner,
        capsnet_onnx,
        [1, 8],
        provider="cuda",
        cuda_graph=True,
        warmup=1,
        iters=5,
        input=images,
        output=tmp_path / "o.cbt",
    )
    assert (
        res["backend"] == "ort_cpp_cuda_graph"
        and res["session"]["cuda_graph"]
        and res["session"]["io_binding"]
    )
    assert (
        res["settings"]["warmup"] >= 3
    )  # raised so that ORT's capture (runs 2-3) stays out of the timed calls
    assert [r["status"] for r in res["rows"]] == ["ok", "ok"]
    assert res["placement"]["all_compute_on_cuda"], res["placement"]["problem"]
    _outputs_match(read_tensors(tmp_path / "o.cbt"), python_ort(capsnet_onnx, images[:8]))

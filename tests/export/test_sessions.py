"""The session factory records the provider actually used and never claims CUDA it did not get."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from capsbench.export import SessionError, make_session
from capsbench.export import sessions as sessions_module
from capsbench.export.sessions import CPU, CUDA, node_placement

no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU"
)


def test_cpu_session_records_provider_threads_and_optimisation(exported, tmp_path):
    s = make_session(
        exported["shallow"].path,
        "cpu",
        threads=1,
        opt_level="basic",
        optimized_model_path=tmp_path / "opt.onnx",
    )
    assert s.provider == CPU == s.session.get_providers()[0]
    assert s.info["threads"] == 1 and s.info["opt_level"] == "basic" and s.info["fallback"] is None
    assert s.session.get_session_options().intra_op_num_threads == 1
    assert (tmp_path / "opt.onnx").is_file()
    assert not s.on_cuda


@no_gpu
def test_auto_provider_uses_cpu_without_a_gpu(exported):
    s = make_session(exported["shallow"].path, "auto")
    assert s.provider == CPU and s.info["requested"] == "auto"
    assert s.info["cuda_graph"] is False and s.info["cuda_options"] is None


@no_gpu
def test_cuda_asked_for_without_a_gpu_is_a_clear_error(exported):
    with pytest.raises(SessionError, match="cuda"):
        make_session(exported["shallow"].path, "cuda")


@no_gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="this onnxruntime has no CUDA provider")
def test_a_cuda_session_that_falls_back_to_cpu_is_recorded_as_cpu(exported, monkeypatch):
    # onnxruntime-gpu lists CUDA as available here, but creating it fails and ORT quietly runs on CPU.
    monkeypatch.setattr(sessions_module, "cuda_device_present", lambda: True)
    s = make_session(exported["shallow"].path, "auto")
    assert s.provider == CPU
    assert "fell back to CPU" in s.info["fallback"]


def test_unknown_provider_or_level_is_refused(exported):
    with pytest.raises(SessionError, match="unknown provider"):
        make_session(exported["shallow"].path, "tpu")
    with pytest.raises(SessionError, match="unknown opt_level"):
        make_session(exported["shallow"].path, "cpu", opt_level="max")
    with pytest.raises(SessionError, match="CUDA graphs"):
        make_session(exported["shallow"].path, "cpu", cuda_graph=True)


def test_node_placement_counts_every_kernel_on_its_provider(exported, fashion):
    counts = node_placement(exported["deep"].path, fashion["test_x"][:1].numpy(), provider="cpu")
    assert set(counts) == {CPU} and counts[CPU] > 20


def test_cpu_runner_times_a_plain_run(exported, fashion):
    s = make_session(exported["shallow"].path, "cpu")
    run, sync = s.runner(fashion["test_x"][:3].numpy())
    assert sync is None
    assert run()[0].shape == (3, 10, 16)


def test_iobinding_runner_fills_fixed_output_buffers(exported, fashion):
    # The CUDA path (device buffers, CUDA graphs) binds like this; here on CPU buffers, so it runs anywhere.
    s = make_session(exported["shallow"].path, "cpu")
    images = fashion["test_x"][:5].numpy()
    run, sync = s.runner(images, iobinding=True)
    (first,) = run()
    sync()
    (again,) = run()
    assert again is first  # the same buffer every run
    np.testing.assert_array_equal(first.numpy(), s.run(images))


def test_placement_names_what_ran_off_the_provider_and_check_does_not_gate_such_a_row():
    """Placement known by construction: shape ops on the CPU beside a CUDA graph are fine; a compute node or a
    Memcpy off CUDA is said, and a row timed so is never gated as ort_cuda (issue 22)."""
    from capsbench.export.sessions import placement_summary
    from capsbench.reports.compare import latency_gate

    fine = placement_summary({CUDA: {"Conv": 3, "MatMul": 4}, CPU: {"Shape": 2, "Gather": 1}})
    assert fine["all_compute_on_cuda"] and fine["problem"] is None and not fine["all_nodes_on_cuda"]
    bad = placement_summary({CUDA: {"Conv": 3, "MemcpyToHost": 1}, CPU: {"Softmax": 2, "Shape": 1}})
    assert not bad["all_compute_on_cuda"]
    assert bad["problem"] == (
        f"compute nodes off {CUDA}: Softmax x2; 1 Memcpy node(s) moved data between devices"
    )
    row = {
        "samples_ms": [1.0] * 10,
        "stable": True,
        "placement_ok": False,
        "placement_problem": bad["problem"],
    }
    verdict = latency_gate([(row, 1), ({"samples_ms": [1.0] * 10, "stable": True}, -1)], 0.2, True)
    assert verdict["status"] == "not_gated" and "Softmax x2" in verdict["noise"]


def test_a_real_cpu_session_runs_every_node_on_its_provider(exported, fashion):
    from capsbench.export.sessions import placement_by_op, placement_summary

    by_op = placement_by_op(exported["deep"].path, fashion["test_x"][:1].numpy(), provider="cpu")
    s = placement_summary(by_op, CPU)
    assert s["problem"] is None and s["all_compute_on_provider"] and "Conv" in by_op[CPU]

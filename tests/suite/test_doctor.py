"""`capsbench doctor` reports what this machine really offers and what capsbench will use, as text and JSON."""

import json

import onnxruntime as ort
import pytest
import torch

from capsbench.suite.doctor import cuda_missing

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without a GPU")


@pytest.mark.slow
def test_doctor_json_matches_this_machine(cli, fashion_data_dir):
    doctor = cli(["doctor", "--json", "--data-dir", str(fashion_data_dir)])
    assert doctor.code == 0
    r = json.loads(doctor.out)
    assert r["torch"]["version"] == torch.__version__
    assert r["torch"]["cuda_available"] is torch.cuda.is_available()
    assert r["torch"]["cuda_build"] == torch.version.cuda
    assert r["onnxruntime"]["version"] == ort.__version__
    assert r["onnxruntime"]["available_providers"] == ort.get_available_providers()
    assert "fashion-mnist" in r["datasets"]["present"]
    assert r["will_use"]["torch_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # The provider a real session got is one ORT offers; the report never invents one.
    assert r["will_use"]["ort_provider"] in ort.get_available_providers()
    assert isinstance(r["docker"]["runtimes"], list) and isinstance(r["docker"]["gpu_runtime"], bool)
    assert set(r["docker"]["nvidia_toolkit"]) == {"hook", "nvidia_ctk", "cdi_specs"}


@no_gpu
@pytest.mark.slow
def test_doctor_on_a_cpu_machine_says_cpu_and_why_cuda_checks_cannot_run(cli, fashion_data_dir):
    doctor = cli(["doctor", "--data-dir", str(fashion_data_dir)])
    assert doctor.code == 0
    out = doctor.out
    assert "CUDA available: no" in out
    assert "capsbench will use: torch on cpu, ONNX Runtime's CPUExecutionProvider" in out
    assert "sees no CUDA device" in out and "sees no CUDA device" in cuda_missing()
    r = json.loads(cli(["doctor", "--json", "--data-dir", str(fashion_data_dir)]).out)
    assert r["onnxruntime"]["session"]["provider"] == "CPUExecutionProvider"
    assert r["torch"]["gpus"] == [] and r["will_use"]["docker_gpus"] is False


def test_a_cuda_major_mismatch_between_onnxruntime_and_torch_is_named(monkeypatch):
    """onnxruntime-gpu 1.31 is a CUDA 13 build; beside a CUDA 12 torch its provider cannot load although ORT lists
    it. doctor's CUDA check names the mismatch instead of saying ready."""
    import torch

    from capsbench.export import latency
    from capsbench.suite import doctor

    monkeypatch.setattr(latency, "ort_build", lambda: {"package": "onnxruntime-gpu", "cuda_version": "13.0"})
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "built for CUDA 13.0, torch for CUDA 12.8" in doctor.cuda_major_mismatch()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert doctor.cuda_major_mismatch() is None
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch: nothing to mismatch
    assert doctor.cuda_major_mismatch() is None


def test_gpus_in_docker_are_seen_through_the_toolkit_hook_and_cdi_specs_too(tmp_path):
    """`docker run --gpus` is served by a registered nvidia runtime, or by the NVIDIA Container Toolkit's hook
    alone (dockerd calls nvidia-container-runtime-hook), or through CDI specs: doctor accepts each, by name."""
    from capsbench.suite.doctor import gpu_support, nvidia_container_toolkit

    bin_dir, cdi = tmp_path / "bin", tmp_path / "cdi"
    bin_dir.mkdir()
    cdi.mkdir()
    nothing = nvidia_container_toolkit(path=str(bin_dir), cdi_dirs=(cdi, tmp_path / "absent"))
    assert nothing == {"hook": None, "nvidia_ctk": None, "cdi_specs": []}
    assert gpu_support(["runc"], nothing) == [] and gpu_support(["nvidia", "runc"], nothing) == [
        "runtime nvidia"
    ]

    hook = bin_dir / "nvidia-container-runtime-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    (cdi / "other.yaml").write_text("cdiVersion: 0.5.0\nkind: vendor.com/device\n")  # not NVIDIA's
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: all\n")
    found = nvidia_container_toolkit(path=str(bin_dir), cdi_dirs=(cdi,))
    assert found["hook"] == str(hook) and found["cdi_specs"] == [str(cdi / "nvidia.yaml")]
    assert gpu_support(["runc"], found) == [f"hook {hook}", f"CDI {cdi / 'nvidia.yaml'}"]

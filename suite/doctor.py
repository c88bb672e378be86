"""What this machine offers capsbench (Python, torch and CUDA, cuDNN, ONNX Runtime providers, the C++ runner's
toolchain, Docker and its GPU runtime, datasets) and what capsbench will use here: `capsbench doctor`.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from capsbench.export.sessions import CUDA


def _first_line(cmd: list[str], timeout: float = 10) -> str | None:
    """The first line a tool prints (stdout, else stderr), or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0].strip() if res.returncode == 0 and text else None


def cuda_missing() -> str | None:
    """None when both torch and ONNX Runtime can run on a CUDA GPU here, else one line saying what is missing.

    The one reason the `cuda` tests skip with and gpu-check stops with.
    """
    import onnxruntime as ort
    import torch

    missing = []
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        missing.append(f"torch {torch.__version__} ({build}) sees no CUDA device")
    if CUDA not in ort.get_available_providers():
        missing.append(f"onnxruntime {ort.__version__} has no {CUDA} (install onnxruntime-gpu)")
    elif (mismatch := cuda_major_mismatch()) is not None:
        missing.append(mismatch)
    return "; ".join(missing) or None


def cuda_major_mismatch() -> str | None:
    """One line when ONNX Runtime's CUDA provider was built for another CUDA major than torch's CUDA build: the
    provider then cannot load its libraries (libcudart.so.13 beside torch's .so.12) although ORT lists it."""
    import torch

    from capsbench.export.latency import ort_build

    ort_cuda, torch_cuda = ort_build().get("cuda_version"), torch.version.cuda
    if not ort_cuda or not torch_cuda or ort_cuda.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (
        f"onnxruntime's CUDA provider is built for CUDA {ort_cuda}, torch for CUDA {torch_cuda}: install the "
        f"onnxruntime-gpu build for CUDA {torch_cuda.split('.')[0]} (or the torch build for CUDA {ort_cuda.split('.')[0]})"
    )


def _torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None for a CPU-only wheel
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpus": [],
        "cudnn": None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if torch.backends.cudnn.is_available():  # the cuDNN a CUDA build loads, GPU or not
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _nvidia_driver() -> dict[str, Any]:
    line = _first_line(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    if line is None:
        return {"nvidia_smi": shutil.which("nvidia-smi") is not None, "driver": None}
    driver, _, name = line.partition(",")
    return {"nvidia_smi": True, "driver": driver.strip(), "gpu": name.strip()}


def _probe_session(available: list[str]) -> dict[str, Any]:
    """The provider a real session gets (ORT may list CUDA and still fall back): a one-node model, 'auto'."""
    import onnx
    from onnx import TensorProto, helper

    from capsbench.export.errors import ExportError, SessionError
    from capsbench.export.sessions import make_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime capsbench supports
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, path)
        try:
            s = make_session(path, "auto", threads=1)
        except (ExportError, SessionError) as e:
            return {"provider": None, "fallback": None, "error": str(e)}
        return {"provider": s.provider, "fallback": s.info["fallback"]}


def _onnxruntime() -> dict[str, Any]:
    import onnxruntime as ort

    from capsbench.export.latency import ort_build

    available = ort.get_available_providers()
    return {
        "version": ort.__version__,
        "package_device": ort.get_device(),  # "GPU" for onnxruntime-gpu, whether or not a GPU is present
        "build": ort_build(),  # the package and the CUDA major its CUDA provider needs
        "available_providers": available,
        "session": _probe_session(available),
    }


def _toolchain() -> dict[str, Any]:
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    cmake = _first_line(["cmake", "--version"])
    return {
        "cmake": cmake.removeprefix("cmake version ").strip() if cmake else None,
        "cxx": cxx,
        "cxx_version": _first_line([cxx, "--version"]) if cxx else None,
    }


# Where the NVIDIA Container Toolkit's CDI specs live (`nvidia-ctk cdi generate` writes one of them).
CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


def nvidia_container_toolkit(
    path: str | None = None, cdi_dirs: tuple[Path, ...] = CDI_DIRS
) -> dict[str, Any]:
    """What serves `docker run --gpus` besides a registered `nvidia` runtime: the toolkit's prestart hook
    (`nvidia-container-runtime-hook`, which dockerd calls for --gpus) or `nvidia-ctk` on PATH, and CDI specs of
    NVIDIA devices (kind nvidia.com/gpu) in /etc/cdi or /var/run/cdi. `path`: a PATH to search instead."""
    specs = []
    for d in cdi_dirs:
        for f in sorted(d.glob("*")) if d.is_dir() else []:
            try:
                if f.suffix in (".yaml", ".yml", ".json") and "nvidia.com/gpu" in f.read_text(
                    errors="replace"
                ):
                    specs.append(str(f))
            except OSError:
                continue
    return {
        "hook": shutil.which("nvidia-container-runtime-hook", path=path),
        "nvidia_ctk": shutil.which("nvidia-ctk", path=path),
        "cdi_specs": specs,
    }


def _docker() -> dict[str, Any]:
    """The docker client binary, and whether a daemon answers, with its runtimes (nvidia = GPU containers), and
    what else of the NVIDIA Container Toolkit serves --gpus (its hook, nvidia-ctk, CDI specs)."""
    toolkit = nvidia_container_toolkit()
    info: dict[str, Any] = {
        "client": _first_line(["docker", "--version"]),
        "daemon": False,
        "runtimes": [],
        "nvidia_toolkit": toolkit,
        "gpu_runtime": False,
        "gpu_support": gpu_support([], toolkit),
    }
    try:
        from capsbench.suite.docker import DockerError, client

        c = client()
    except DockerError as e:
        info["daemon_error"] = str(e)
        return info
    try:
        daemon = c.info()
        info.update(daemon=True, server_version=daemon.get("ServerVersion"))
        info["runtimes"] = sorted(daemon.get("Runtimes") or {})
        info["gpu_support"] = gpu_support(info["runtimes"], toolkit)
        info["gpu_runtime"] = bool(info["gpu_support"])
    finally:
        c.close()
    return info


def gpu_support(runtimes: list[str], toolkit: dict[str, Any]) -> list[str]:
    """What lets a daemon give containers GPUs: a registered nvidia runtime, the toolkit's hook or nvidia-ctk,
    NVIDIA CDI specs (empty: nothing found)."""
    found = ["runtime nvidia"] if "nvidia" in runtimes else []
    found += [
        f"{name} {toolkit[key]}"
        for key, name in (("hook", "hook"), ("nvidia_ctk", "nvidia-ctk"))
        if toolkit[key]
    ]
    found += [f"CDI {spec}" for spec in toolkit["cdi_specs"]]
    return found


def _datasets(data_dir: str | Path | None) -> dict[str, Any]:
    from capsbench.suite import data

    rows = data.status(data_dir)
    return {
        "data_dir": str(data.resolve_data_dir(data_dir)),
        "present": [r["name"] for r in rows if r["state"] == data.DatasetState.VERIFIED],
        "problems": {
            r["name"]: r["state"]
            for r in rows
            if r["state"] not in (data.DatasetState.VERIFIED, data.DatasetState.MISSING)
        },
    }


def diagnose(data_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything `capsbench doctor` reports, JSON-ready."""
    from capsbench import __version__
    from capsbench.export.latency import machine_info
    from capsbench.suite.env import pick_device

    report: dict[str, Any] = {
        "capsbench": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "machine": machine_info(),
        "torch": _torch(),
        "nvidia": _nvidia_driver(),
        "onnxruntime": _onnxruntime(),
        "cpp_toolchain": _toolchain(),
        "docker": _docker(),
        "datasets": _datasets(data_dir),
    }
    ort_provider = report["onnxruntime"]["session"]["provider"]
    report["will_use"] = {
        "torch_device": str(pick_device(None)),
        "ort_provider": ort_provider,
        "cpp_runner": bool(report["cpp_toolchain"]["cmake"] and report["cpp_toolchain"]["cxx"]),
        "docker_gpus": report["docker"]["gpu_runtime"] and report["nvidia"]["driver"] is not None,
        "cuda_checks": cuda_missing() or "ready",
    }
    return report


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_report(r: dict[str, Any]) -> str:
    from capsbench.export.latency import machine_line

    t, o, tc, d, ds, use = (
        r["torch"],
        r["onnxruntime"],
        r["cpp_toolchain"],
        r["docker"],
        r["datasets"],
        r["will_use"],
    )
    gpus = ", ".join(t["gpus"]) or "none"
    cuda = f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU-only build"
    driver = r["nvidia"]["driver"] or ("nvidia-smi fails" if r["nvidia"]["nvidia_smi"] else "no nvidia-smi")
    runtimes = ", ".join(d["runtimes"]) or "-"
    daemon = f"daemon {d.get('server_version')}, runtimes: {runtimes}" if d["daemon"] else "no daemon answers"
    lines = [
        f"capsbench   {r['capsbench']}  ({r['platform']})",
        f"python      {r['python']['version']}  {r['python']['executable']}",
        f"machine     {machine_line(r['machine'])}",
        f"torch       {t['version']} ({cuda}); CUDA available: {_yes(t['cuda_available'])}; GPUs: {gpus}",
        f"cudnn       {t['cudnn'] if t['cudnn'] is not None else 'not available'}",
        f"nvidia      driver: {driver}",
        f"onnxruntime {o['version']} ({o['package_device']} package); providers: "
        + ", ".join(o["available_providers"]),
        f"            a session here runs on: {o['session']['provider'] or 'none'}"
        + (f" ({o['session']['fallback']})" if o["session"].get("fallback") else ""),
        f"c++ runner  cmake: {tc['cmake'] or 'missing'}; compiler: {tc['cxx_version'] or 'missing'}",
        f"docker      client: {d['client'] or 'missing'}; {daemon}; GPUs in containers (NVIDIA runtime, "
        f"toolkit hook or CDI): {', '.join(d['gpu_support']) or 'no'}",
        f"datasets    {', '.join(ds['present']) or 'none'} in {ds['data_dir']}"
        + "".join(f"; {name}: {state}" for name, state in ds["problems"].items()),
        "",
        f"capsbench will use: torch on {use['torch_device']}, ONNX Runtime's {use['ort_provider']}, "
        f"C++ runner: {_yes(use['cpp_runner'])}, GPUs in Docker: {_yes(use['docker_gpus'])}",
        f"CUDA checks (scripts/gpu-check.sh): {use['cuda_checks']}",
    ]
    return "\n".join(lines)

"""What a result was measured on: versions, hardware, device, git commit.

Recorded in every run so reports and CI know whether two numbers are comparable.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from capsbench.export.latency import cpu_model


def pick_device(requested: str | None = None) -> torch.device:
    """'cuda' when present (or asked for), else 'cpu'; a clear error when CUDA is asked for and missing."""
    from capsbench.suite.errors import ConfigError

    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def compile_unavailable() -> str | None:
    """Why torch.compile cannot work here, else None: Inductor builds its CPU kernels with a C++ compiler and
    Triton its launcher with a C compiler and Python's headers, at run time (the container's final stage ships
    none of them)."""
    import shutil
    import sysconfig

    compilers = {
        "a C compiler": (os.environ.get("CC"), "cc", "gcc", "clang"),
        "a C++ compiler": (os.environ.get("CXX"), "c++", "g++", "clang++"),
    }
    missing = [what for what, names in compilers.items() if not any(shutil.which(n) for n in names if n)]
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("Python's headers (Python.h)")
    if not missing:
        return None
    return f"torch.compile needs {', '.join(missing)} at run time, and this machine has none"


@lru_cache(maxsize=4)
def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout at `root` (default: this package's), else $CAPSBENCH_GIT_COMMIT, else None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=root or Path(__file__).parent,
            timeout=5,
        )
        commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    # The container image has no git and no .git: its build records the commit instead.
    return commit or os.environ.get("CAPSBENCH_GIT_COMMIT") or None


def environment(device: torch.device | None = None) -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        # The machine fingerprint (reports/compare.py) is cpu, cpu_count and gpu: hardware facts. cpu_threads
        # is this process's torch setting (OMP_NUM_THREADS, --threads), informative only.
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
    }
    try:
        import onnx
        import onnxruntime

        env["onnx"] = onnx.__version__
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
    if device is not None:
        env["device"] = str(device)
    return env

"""What an offline image build needs, prepared on the host (CI has no image registry and no HTTPS to PyPI inside
containers): the build context's requirements, a wheelhouse filled by the host's pip, ONNX Runtime's headers;
and the names and errors the Docker driver shares."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from capsbench.suite.errors import CapsbenchError

DEFAULT_TAG = "capsbench"
# Local images made with debootstrap (Debian 12, Python 3.11 like the project's machines): the runtime base,
# and the builder with cmake and g++ for the C++ runner. Same suite, so the same python3 in both.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCAL_BASE = f"capsbench-base:{DEBIAN_SUITE}"
LOCAL_BUILDER = f"capsbench-base-build:{DEBIAN_SUITE}"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
BUILDER_PACKAGES = (*BASE_PACKAGES, "cmake", "g++", "make")
# Inside the build context (the checkout; build/ is git-ignored, .dockerignore lets build/docker/ through).
EXTRAS = Path("build") / "docker"
WHEELS = EXTRAS / "wheels"
ORT_HEADERS = EXTRAS / "onnxruntime-include"
# Defaults of the Dockerfile's TORCH and ORT build arguments.
TORCH = "torch==2.13.0"
ORT_VERSION = "1.31.1"  # pyproject.toml pins the same (tests/suite/docker/test_docker.py checks they agree)
ORT_GPU = f"onnxruntime-gpu=={ORT_VERSION}"
ORT_CPU = (
    f"onnxruntime=={ORT_VERSION}"  # the CPU-only build of the same release: a 17 MB wheel for CI's image
)
# What the private daemon of CI and the tests keeps between runs on one machine (images, build cache, .debs).
CACHE = Path(os.environ.get("CAPSBENCH_DOCKER_CACHE", "/var/tmp/capsbench-docker"))
NETWORKS = ("none", "host")  # never the default bridge network

Log = Callable[[str], None]


class DockerError(CapsbenchError):
    """Docker is missing, unreachable, or a build or run failed."""


class DaemonUnavailable(DockerError):
    """No Docker daemon answers."""


class ImageMissing(DockerError):
    """The image to run (or build on) does not exist."""


class BuildFailed(DockerError):
    """`docker build` stopped with an error."""


def source_root(context: str | Path | None = None) -> Path:
    """The checkout holding the Dockerfile: `context`, else the one this package was installed from (editable
    installs), else the current folder."""
    candidates = [Path(context)] if context else [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "Dockerfile").is_file() and (root / "pyproject.toml").is_file():
            return root.absolute()
    raise DockerError(
        f"no Dockerfile in {' or '.join(map(str, candidates))}: building the image needs a source checkout of "
        "capsbench; run from one or pass --context DIR"
    )


def image_requirements(root: Path, torch: str = TORCH, ort: str = ORT_GPU) -> list[str]:
    """What the Dockerfile installs: torch, pyproject's dependencies with onnxruntime-gpu replaced by `ort`,
    and setuptools (to build the package without build isolation). Mirrors the Dockerfile's RUN."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed package's metadata says the same
        from importlib.metadata import requires

        deps = [r for r in requires("capsbench") or [] if "extra ==" not in r]
    else:
        with open(root / "pyproject.toml", "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    keep = [d for d in deps if not d.startswith(("onnxruntime", "torch"))]
    return [torch, *keep, ort, "setuptools>=68"]


def prepare_wheelhouse(
    dest: Path, requirements: Sequence[str], python_version: str | None = None, log: Log = print
) -> Path:
    """Download wheels for `requirements` (dependencies included) into `dest` with this host's pip.

    Binary wheels only, for `python_version` (the image's; default this interpreter's). On the project's
    machines `torch==2.13.0` resolves to the CPU wheel on disk. Files already there are kept.
    """
    dest.mkdir(parents=True, exist_ok=True)
    version = python_version or "{}.{}".format(*sys.version_info[:2])
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest)]
    cmd += ["--only-binary=:all:", "--python-version", version, *requirements]
    log(f"wheelhouse: pip download for Python {version} into {dest}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        errors = [line for line in res.stderr.splitlines() if "is ignored" not in line]
        raise DockerError(
            "pip download for the wheelhouse failed:\n"
            + "\n".join(errors[-8:])
            + "\n(PyPI must be reachable "
            "from this host, or pass --wheelhouse DIR with the wheels already there)"
        )
    return dest


def prepare_ort_headers(dest: Path, log: Log = print) -> Path:
    """ONNX Runtime's C/C++ headers for the runner, copied (not linked) into `dest` inside the build context.

    From export/cpp/provision_ort.sh (Debian trixie's libonnxruntime-dev, fetched on this host with apt-get
    download), since no registry is reachable during an offline build.
    """
    from capsbench.export.cpp_runner import provision_ort

    include = provision_ort() / "include"
    if not (include / "onnxruntime_cxx_api.h").is_file():
        raise DockerError(f"{include} holds no onnxruntime_cxx_api.h; rerun export/cpp/provision_ort.sh")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # unique: no two builds collide
    try:
        shutil.copytree(include, tmp, symlinks=False, dirs_exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"ONNX Runtime headers: {include} -> {dest}")
    return dest

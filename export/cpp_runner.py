"""The C++ runner (export/cpp/) from Python: the CBT1 tensor files it reads and writes, provisioning ONNX Runtime
and building it with CMake (cached by a hash of its sources), and running it for the harness's JSON rows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from capsbench.export.errors import ExportError
from capsbench.export.latency import Contention, judge_contention, summarize
from capsbench.export.sessions import CPU, EXECUTION_PROVIDERS, placement_summary
from capsbench.files import atomic_write

CPP_DIR = Path(__file__).resolve().parent / "cpp"
RUNNER = "capsbench-runner"
MAGIC = b"CBT1"
# CBT1 dtype codes are ONNX TensorProto element types (see cpp/tensor_io.h).
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.float32): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int8): 3,
    np.dtype(np.int16): 5,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.bool_): 9,
    np.dtype(np.float16): 10,
    np.dtype(np.float64): 11,
}
CODE_DTYPES: dict[int, np.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
# What the runner's exit codes mean (runner.cpp); 6 still writes the JSON, with the failed rows in it.
EXIT_CODES = {
    1: "runtime error",
    2: "usage error",
    3: "bad model",
    4: "bad input",
    5: "provider unavailable",
    6: "some batch sizes failed",
}
PARTIAL = 6


class CppRunnerError(ExportError):
    """The C++ runner could not be provisioned, built or run."""


class BuildError(CppRunnerError):
    """cmake or a C++ compiler is missing, ONNX Runtime's headers could not be provisioned, or the build failed."""


class RunnerError(CppRunnerError):
    """The runner exited with an error; `returncode` and `stderr` say why."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


# -------------------------------------------------------------------------------------------- tensor files


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def tensor_record(array: np.ndarray) -> bytes:
    """One CBT1 record: magic, dtype code, ndim, int64 dims, then the data in C order, all little-endian."""
    a = np.asarray(array)
    if a.dtype not in DTYPE_CODES:
        raise ValueError(
            f"CBT1 has no code for dtype {a.dtype}; use one of {', '.join(map(str, DTYPE_CODES))}"
        )
    head = MAGIC + struct.pack("<II", DTYPE_CODES[a.dtype], a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    return head + np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def write_tensor(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as a CBT1 file (atomically), for the runner's --input."""
    path = Path(path)
    _atomic_write(path, tensor_record(array))
    return path


def read_tensors(path: str | Path) -> list[np.ndarray]:
    """Every record of a CBT1 file (the runner's --output holds one per model output, in the model's order)."""
    path = Path(path)
    raw = path.read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        if raw[pos : pos + 4] != MAGIC or len(raw) < pos + 12:
            raise ValueError(f"{path}: not a CBT1 tensor file at byte {pos} (bad magic or truncated header)")
        code, ndim = struct.unpack_from("<II", raw, pos + 4)
        if code not in CODE_DTYPES or ndim > 16:
            raise ValueError(f"{path}: corrupt CBT1 header at byte {pos} (dtype code {code}, ndim {ndim})")
        shape = struct.unpack_from(f"<{ndim}q", raw, pos + 12)
        pos += 12 + 8 * ndim
        dtype = CODE_DTYPES[code].newbyteorder("<")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(raw) < pos + size:
            raise ValueError(
                f"{path}: truncated: shape {shape} {dtype} needs {size} bytes, {len(raw) - pos} left"
            )
        out.append(np.frombuffer(raw, dtype, count=size // dtype.itemsize, offset=pos).reshape(shape).copy())
        pos += size
    if not out:
        raise ValueError(f"{path}: empty CBT1 file")
    return out


def read_tensor(path: str | Path) -> np.ndarray:
    """The first record of a CBT1 file."""
    return read_tensors(path)[0]


# ----------------------------------------------------------------------------------------------- building


def cache_root() -> Path:
    """$XDG_CACHE_HOME/capsbench, else ~/.cache/capsbench: where provisioned runtimes and builds live."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsbench"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created), so parallel test workers build once, one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def provision_ort(dest: str | Path | None = None) -> Path:
    """An ONNX Runtime root for CMake: Debian trixie's headers (downloaded once, cached) and symlinks to this
    Python's onnxruntime library. Fast when already done. See cpp/provision_ort.sh."""
    cmd = ["bash", str(CPP_DIR / "provision_ort.sh")] + ([str(dest)] if dest is not None else [])
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"provisioning ONNX Runtime for the C++ runner failed: {e}") from e
    if res.returncode != 0:
        raise BuildError(
            f"provisioning ONNX Runtime for the C++ runner failed: {_tail(res.stderr, 5)}; or unpack ONNX "
            "Runtime's release archive and pass its folder as ort_root (ONNXRUNTIME_ROOT)"
        )
    return Path(res.stdout.strip().splitlines()[-1])


def _check_tools() -> None:
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    missing = [
        name for name, ok in (("cmake", shutil.which("cmake")), ("a C++17 compiler", compiler)) if not ok
    ]
    if missing:
        raise BuildError(
            f"building the C++ runner needs {' and '.join(missing)}: apt-get install cmake g++ "
            "(or your platform's equivalent)"
        )


def source_hash(ort_root: Path | None = None, *, asan: bool = False) -> str:
    """A hash of everything the build depends on: the runner's sources, the ONNX Runtime root, this Python."""
    h = hashlib.sha256()
    sources = [
        *CPP_DIR.glob("*.cpp"),
        *CPP_DIR.glob("*.h"),
        CPP_DIR / "CMakeLists.txt",
        *CPP_DIR.glob("tests/*"),
    ]
    for f in sorted(p for p in sources if p.is_file()):
        h.update(str(f.relative_to(CPP_DIR)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(str(ort_root).encode() + b"\0" + sys.executable.encode())
    return h.hexdigest()[:16] + ("-asan" if asan else "")


def build_runner(
    build_dir: str | Path | None = None,
    ort_root: str | Path | None = None,
    *,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
    asan: bool = False,
) -> Path:
    """Configure and build `capsbench-runner` with CMake; returns the binary. Cached: the default build dir is
    <cache>/cpp-build/<hash of the sources and runtime>, and a finished build is returned at once.

    ort_root: an ONNX Runtime root (include/, lib/); default $ONNXRUNTIME_ROOT, else `provision_ort()`.
    The CTest suite is configured too (`ctest --test-dir <build dir>`), with this Python for its fixtures.
    $CAPSBENCH_RUNNER names a runner built ahead of time (the container image has no compiler).
    asan: with AddressSanitizer and UndefinedBehaviorSanitizer (-DCAPSBENCH_ASAN=ON), in a build dir of its own
    (`<hash>-asan`), for tests of the runner's memory handling (never for timing: the checks slow every call).
    """
    prebuilt = os.environ.get("CAPSBENCH_RUNNER")
    if prebuilt and build_dir is None and ort_root is None and not asan:
        if not Path(prebuilt).is_file():
            raise BuildError(f"CAPSBENCH_RUNNER={prebuilt} is not a file; unset it to build the runner here")
        return Path(prebuilt)
    _check_tools()
    say = progress or (lambda _: None)
    if ort_root is None and os.environ.get("ONNXRUNTIME_ROOT"):
        ort_root = os.environ["ONNXRUNTIME_ROOT"]
    if ort_root is None:
        with _locked(cache_root() / "locks" / "provision.lock"):
            ort_root = provision_ort()
    ort_root = Path(ort_root).expanduser().absolute()
    key = source_hash(ort_root, asan=asan)
    build = Path(build_dir) if build_dir is not None else cache_root() / "cpp-build" / key
    build = build.expanduser().absolute()
    binary, stamp = build / RUNNER, build / ".capsbench-built"

    with _locked(cache_root() / "locks" / f"build-{key}.lock"):
        if binary.is_file() and stamp.is_file() and stamp.read_text() == key:
            return binary
        say(f"building {RUNNER} in {build} (ONNX Runtime root {ort_root})")
        steps = [
            [
                "cmake",
                "-S",
                str(CPP_DIR),
                "-B",
                str(build),
                f"-DONNXRUNTIME_ROOT={ort_root}",
                f"-DPython3_EXECUTABLE={sys.executable}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCAPSBENCH_ASAN={'ON' if asan else 'OFF'}",
            ],
            ["cmake", "--build", str(build), "--parallel", str(jobs or min(os.cpu_count() or 1, 4))],
        ]
        stamp.unlink(missing_ok=True)
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise BuildError(
                    f"{' '.join(cmd[:2])} failed for the C++ runner:\n{_tail(res.stdout + res.stderr)}"
                )
        if not binary.is_file():
            raise BuildError(f"the build finished but {binary} is missing")
        stamp.write_text(key)
    return binary


def run_ctest(build_dir: str | Path, timeout: float = 300) -> str:
    """Run the runner's CTest suite in a build dir (see build_runner); its output, or RunnerError."""
    cmd = ["ctest", "--test-dir", str(build_dir), "--output-on-failure", "--timeout", "60"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RunnerError(f"ctest failed:\n{_tail(res.stdout + res.stderr, 60)}", res.returncode, res.stderr)
    return res.stdout


# ------------------------------------------------------------------------------------------------ running


def _cuda_library_path() -> list[str]:
    """lib folders of the nvidia-* wheels (CUDA, cuDNN) that torch installs: onnxruntime.preload_dlls() finds
    them for Python; the runner gets them on LD_LIBRARY_PATH."""
    dirs = []
    for site in map(Path, sys.path):
        nvidia = site / "nvidia"
        if nvidia.is_dir():
            dirs += sorted(str(p) for p in nvidia.glob("*/lib") if p.is_dir())
    return list(dict.fromkeys(dirs))


def runner_placement(result: dict[str, Any]) -> dict[str, Any] | None:
    """The runner's node placement (session.placement: kernels per provider and op type in one profiled run)
    judged as the Python time stage judges its sessions' (`sessions.placement_summary`): every compute node on
    the requested provider and no Memcpy node, else `problem`. None when the runner could not profile."""
    session = result.get("session") or {}
    by_op = session.get("placement")
    if by_op is None:
        return None
    return placement_summary(by_op, session.get("provider") or result.get("provider") or CPU)


def label_placement(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with `placement` (runner_placement) and, when its compute did not all run on the requested
    provider (or that is unknown off the CPU), every row marked `placement_ok: False` with `placement_problem`,
    exactly as the Python time stage marks its rows (such a row is kept and never gated by `capsbench check`)."""
    summary = runner_placement(result)
    session = result.get("session") or {}
    problem = summary["problem"] if summary is not None else None
    if summary is None and session.get("requested", "cpu") != "cpu":
        problem = f"placement unknown: {session.get('placement_error') or 'the runner recorded none'}"
    rows = result.get("rows", [])
    if problem is not None:
        rows = [{**r, "placement_ok": False, "placement_problem": problem} for r in rows]
    return {**result, "placement": summary, "rows": rows}


def run_runner(
    binary: str | Path,
    model: str | Path,
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    warmup: int = 10,
    iters: int = 100,
    provider: str = "cpu",
    input: str | Path | np.ndarray | None = None,
    output: str | Path | None = None,
    *,
    io_binding: bool | None = None,
    cuda_graph: bool = False,
    max_seconds: float | None = None,
    opt_level: str = "all",
    timeout: float | None = None,
) -> dict[str, Any]:
    """Time `model` with the C++ runner; its JSON: `rows` has one row per batch size with the harness's fields
    (backend 'ort_cpp_cpu'/'ort_cpp_cuda'/'ort_cpp_cuda_graph', p50_ms, ..., status/error), the statistics
    recomputed from the runner's raw samples by `latency.summarize` (spread, stability, samples_ms), unstable
    when other processes took the cores while it ran (`latency.Contention`). `placement`: where the nodes ran
    (`runner_placement`); rows whose compute partly ran elsewhere say so (`label_placement`).

    input: a CBT1 file or an array (written to a temporary file); batch b takes its first b rows, cycling.
    None: random uniform [0, 1). output: the outputs of the last run (last batch size) as CBT1 records.
    io_binding: default on CUDA (device buffers, as the Python harness does). threads: default all cores.
    RunnerError (with the runner's stderr) when it fails; a batch size that fails alone is a row with
    status 'error', as in the harness's sweep.
    """
    with tempfile.TemporaryDirectory(prefix="capsbench-runner-") as tmp:
        if isinstance(input, np.ndarray):
            input = write_tensor(Path(tmp) / "input.cbt", input)
        json_path = Path(tmp) / "result.json"
        cmd = [str(binary), "--model", str(model), "--provider", provider, "--opt-level", opt_level]
        cmd += [
            "--batch",
            ",".join(str(int(b)) for b in batch_sizes),
            "--warmup",
            str(warmup),
            "--iters",
            str(iters),
        ]
        cmd += ["--json", str(json_path)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if input is not None:
            cmd += ["--input", str(input)]
        if output is not None:
            cmd += ["--output", str(output)]
        ep = next((e for e in EXECUTION_PROVIDERS.values() if e.runner_flag == provider), None)
        if io_binding if io_binding is not None else (ep is not None and ep.iobinding):
            cmd.append("--io-binding")
        if cuda_graph:
            cmd.append("--cuda-graph")
        if max_seconds is not None:
            cmd += ["--max-seconds", str(max_seconds)]
        env = dict(os.environ)
        if provider == "cuda" and (libs := _cuda_library_path()):
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(
                os.pathsep
            )
        try:
            with Contention() as contention:  # other processes beside the runner's
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except FileNotFoundError as e:
            raise RunnerError(f"{binary}: runner not found; build it with build_runner()") from e
        except subprocess.TimeoutExpired as e:
            raise RunnerError(f"{RUNNER} on {model} ran past {timeout} s") from e
        if res.returncode in (0, PARTIAL) and json_path.is_file():
            result = json.loads(json_path.read_text())
            result["stderr"] = res.stderr.strip() or None
            for row in result.get("rows", []):
                if row.get("status", "ok") == "ok" and row.get("samples_ms"):
                    # one summariser for every route: spread and stability as the Python harness computes them
                    first = row.get("first_run_ms")
                    seconds = [x / 1e3 for x in row["samples_ms"]]
                    stats = summarize(seconds, row["batch"], None if first is None else first / 1e3)
                    row.update(judge_contention(stats, contention))
            return label_placement(result)
        why = EXIT_CODES.get(res.returncode, f"exit code {res.returncode}")
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "(no message)"
        raise RunnerError(f"{RUNNER} failed ({why}): {last}", res.returncode, res.stderr)

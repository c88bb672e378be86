"""The container, for real: a Docker daemon (started here when none runs), the local Debian base images, the
image built offline from a wheelhouse, and the smoke benchmark run in it with no network, results on the host.

Slow (minutes; the first run on a machine also builds the base images): it runs in CI (CI=true) and with
CAPSBENCH_DOCKER_TESTS=1 (tox -e docker), and is skipped otherwise. The first tests need no daemon.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from capsbench.suite import docker as dk

REPO = Path(__file__).resolve().parents[3]  # the checkout: the build context
TAG = "capsbench:ci"
NON_ROOT = (4242, 4242)  # a uid:gid the image does not know, as a host user's would be

needs_docker = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.environ.get("CI") or os.environ.get("CAPSBENCH_DOCKER_TESTS")),
        reason="builds and runs the Docker image (minutes): set CAPSBENCH_DOCKER_TESTS=1 or run tox -e docker",
    ),
]


# ------------------------------------------------------------------------------------ a private daemon (tests)


def start_daemon(root: Path = dk.CACHE, timeout: float = 60) -> tuple[str, subprocess.Popen]:
    """Start a private dockerd (root only) keeping its images in `root`/data, so they survive between runs.

    No bridge network and no iptables rules: containers run with network "none" (or "host"). Returns the
    daemon's address (unix://...) and its process; `stop_daemon` ends it.
    """
    if os.geteuid() != 0:
        raise dk.DockerError(
            "starting a Docker daemon needs root (or start one yourself and set DOCKER_HOST)"
        )
    if not shutil.which("dockerd"):
        raise dk.DockerError("dockerd is not installed: apt-get install docker.io (Debian/Ubuntu)")
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    url = f"unix://{sock}"
    with open(root / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
                f"--host={url}",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (root / "dockerd.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise dk.DockerError(f"dockerd exited with code {proc.returncode}: " + " | ".join(tail))
        try:
            dk.client(url).close()
            return url, proc
        except dk.DaemonUnavailable:
            time.sleep(0.5)
    stop_daemon(proc)
    raise dk.DockerError(
        f"dockerd did not answer at {url} within {timeout:.0f} s; see {root / 'dockerd.log'}"
    )


def stop_daemon(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the daemon we started (it stops its containers and its containerd), then wait."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------- without a daemon


def test_the_build_context_is_this_checkout_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no Dockerfile here: found from the installed package's location
    assert dk.source_root() == REPO


def test_onnxruntime_is_pinned_to_one_version_everywhere():
    """pyproject, the image's default and CI's CPU-only image name one ONNX Runtime release: a range let pip take
    a build for another CUDA major than the one torch brings."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"onnxruntime-gpu=={dk.ORT_VERSION}" in deps and "onnx==1.23.2" in deps
    assert (
        f"onnxruntime-gpu=={dk.ORT_VERSION}" == dk.ORT_GPU and f"onnxruntime=={dk.ORT_VERSION}" == dk.ORT_CPU
    )
    assert f"ARG ORT={dk.ORT_GPU}\n" in (REPO / "Dockerfile").read_text()
    import onnxruntime

    assert onnxruntime.__version__ == dk.ORT_VERSION  # what scripts/install.sh installed here


def test_image_requirements_swap_onnxruntime_gpu_for_the_chosen_runtime():
    reqs = dk.image_requirements(REPO, torch="torch==2.13.0", ort="onnxruntime")
    assert reqs[0] == "torch==2.13.0" and "onnxruntime" in reqs
    assert not any(r.startswith(("onnxruntime-gpu", "torch>")) for r in reqs)
    assert "onnx==1.23.2" in reqs and any(r.startswith("docker") for r in reqs)


def test_gpu_requests_ask_for_every_gpu_or_none():
    (request,) = dk.gpu_requests("all")
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    assert dk.gpu_requests("none") == []
    with pytest.raises(dk.DockerError, match="auto, all or none"):
        dk.gpu_requests("some")


def test_unreachable_daemon_says_how_to_start_one(tmp_path):
    with pytest.raises(dk.DaemonUnavailable, match="start it"):
        dk.client(f"unix://{tmp_path / 'no-daemon.sock'}")


def test_the_dataset_is_mounted_read_only_in_the_container():
    from capsbench.suite.docker.driver import data_mount_mode

    assert data_mount_mode(["all", "--preset", "smoke"]) == "ro"
    assert data_mount_mode(["data", "fetch", "fashion-mnist"]) == "rw"


# -------------------------------------------------------------------------------------------- with a daemon


def _install_tools() -> None:
    """dockerd and debootstrap from Debian's packages when missing (root with apt), else skip."""
    missing = [
        p for p, cmd in (("docker.io", "dockerd"), ("debootstrap", "debootstrap")) if not shutil.which(cmd)
    ]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{' and '.join(missing)} missing, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


@pytest.fixture(scope="module")
def docker_url():
    """$DOCKER_HOST, the default socket, or the private daemon of an earlier run; else start one for this
    module (as root: installed with apt when missing) and stop it at the end."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]  # explicit: use it or fail
        return
    for url in ("unix:///var/run/docker.sock", f"unix://{dk.CACHE / 'docker.sock'}"):
        try:
            dk.client(url).close()
        except dk.DaemonUnavailable:
            continue
        yield url
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon answers and starting one needs root (or set DOCKER_HOST)")
    _install_tools()
    url, proc = start_daemon(dk.CACHE)
    try:
        yield url
    finally:
        stop_daemon(proc)


@pytest.fixture(scope="module")
def docker_client(docker_url):
    c = dk.client(docker_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def image(docker_client) -> str:
    """The image, built offline (network none) on the local Debian base from a wheelhouse, with the CPU-only
    onnxruntime (a 17 MB wheel instead of onnxruntime-gpu's 250 MB); layers are cached between runs."""
    if not all(dk.image_exists(docker_client, i) for i in (dk.LOCAL_BASE, dk.LOCAL_BUILDER)):
        if os.geteuid() != 0:
            pytest.skip(
                f"the base images {dk.LOCAL_BASE}, {dk.LOCAL_BUILDER} are missing; debootstrap needs root"
            )
        _install_tools()  # debootstrap
    t0 = time.perf_counter()
    dk.build_image(tag=TAG, offline=True, ort=dk.ORT_CPU, context=REPO, c=docker_client, log=print)
    print(f"image {TAG} ready in {time.perf_counter() - t0:.0f} s")
    return TAG


def _exec(docker_client, entrypoint: str, args: list[str]) -> tuple[int, str]:
    """Run `entrypoint args` in the image, not through capsbench; removes the container and its volumes."""
    container = docker_client.containers.run(
        TAG, args, entrypoint=[entrypoint], network_mode="none", detach=True
    )
    try:
        code = container.wait()["StatusCode"]
        return code, container.logs().decode(errors="replace")
    finally:
        container.remove(force=True, v=True)  # the image's VOLUMEs would otherwise linger


def _run(docker_client, args, **kw) -> tuple[int, str]:
    out = io.BytesIO()
    code = dk.run_container(args, image=TAG, gpus="none", c=docker_client, out=out, log=lambda _: None, **kw)
    return code, out.getvalue().decode(errors="replace")


@pytest.mark.usefixtures("image")
class TestImage:
    pytestmark = needs_docker

    def test_runs_as_non_root_and_has_no_compilers(self, docker_client):
        code, out = _exec(
            docker_client,
            "/bin/sh",
            ["-c", "id -u; for t in cc gcc g++ cmake make; do command -v $t; done; true"],
        )
        assert code == 0, out
        lines = out.split()
        assert lines[0] != "0", "the image's default user is root"
        assert lines[1:] == [], f"compilers in the final image: {lines[1:]}"

    def test_help_exits_zero(self, docker_client, tmp_path):
        code, out = _run(docker_client, ["--help"], runs_dir=tmp_path / "runs", data_dir=tmp_path / "data")
        assert code == 0, out
        assert "usage: capsbench" in out and "no GPU" not in out

    def test_bad_command_exits_non_zero_with_a_clear_message(self, docker_client, tmp_path):
        code, out = _run(
            docker_client, ["no-such-command"], runs_dir=tmp_path / "runs", data_dir=tmp_path / "d"
        )
        assert code == 2, out
        assert "invalid choice: 'no-such-command'" in out

    def test_cpu_fallback_is_announced(self, docker_client, tmp_path):
        code, out = _run(docker_client, ["presets"], runs_dir=tmp_path / "runs", data_dir=tmp_path / "data")
        assert code == 0, out
        assert "no GPU in this container (start it with --gpus all for CUDA): running on the CPU" in out

    def test_cpp_runner_links_the_images_onnxruntime(self, docker_client):
        code, out = _exec(docker_client, "capsbench-runner", ["--help"])
        assert code == 0 and "--model" in out, out

    def test_missing_image_says_to_build_it(self, docker_client):
        with pytest.raises(dk.ImageMissing, match="capsbench docker build"):
            dk.run_container(["--help"], image="capsbench:no-such-tag", c=docker_client, log=lambda _: None)

    def test_smoke_benchmark_runs_offline_and_leaves_results_on_the_host(
        self, docker_client, fashion_data_dir, tmp_path
    ):
        runs = tmp_path / "runs"
        runs.mkdir()
        user = None
        if os.geteuid() == 0:  # run as an ordinary host user would: files on the host are theirs
            os.chown(runs, *NON_ROOT)
            user = "{}:{}".format(*NON_ROOT)
        # The whole pipeline in the image, offline, on less data and one timing round: what this test asserts
        # is that every stage runs there and leaves its results on the host (the smoke preset's accuracy on
        # its full data is asserted on the host, tests/suite/cli/test_train.py).
        args = ["all", "--preset", "smoke", "--train-subset", "3000", "--eval-subset", "500", "--epochs", "1"]
        args += ["--batch-sizes", "1", "8", "--iters", "10", "--rounds", "1", "--no-progress"]
        t0 = time.perf_counter()
        code, out = _run(docker_client, args, runs_dir=runs, data_dir=fashion_data_dir, user=user)
        print(f"capsbench {' '.join(args)} in the container: {time.perf_counter() - t0:.0f} s")
        assert code == 0, out[-4000:]

        run = runs / "smoke"
        configs = sorted(p for p in run.iterdir() if (p / "config.json").is_file())
        assert len(configs) == 2, sorted(run.iterdir())
        for cfg in configs:
            metrics = json.loads((cfg / "metrics.json").read_text())
            assert metrics["test_accuracy"] > 0.3, metrics  # chance is 0.1
            assert json.loads((cfg / "health.json").read_text())["schema_version"] >= 1
        assert "results: runs/smoke" in out
        if args[0] == "all":
            assert (run / "report.html").is_file(), sorted(run.iterdir())
        if user:
            owners = {p.stat().st_uid for p in run.rglob("*")}
            assert owners == {NON_ROOT[0]}, owners

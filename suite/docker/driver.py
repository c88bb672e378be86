"""Docker for capsbench through the `docker` SDK: local base images made with debootstrap, the image built from
what prep.py prepared (progress streamed), and the suite run in it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from capsbench.suite.docker.prep import (
    BASE_PACKAGES,
    BUILDER_PACKAGES,
    CACHE,
    DEBIAN_MIRROR,
    DEBIAN_SUITE,
    DEFAULT_TAG,
    LOCAL_BASE,
    LOCAL_BUILDER,
    NETWORKS,
    ORT_GPU,
    ORT_HEADERS,
    TORCH,
    WHEELS,
    BuildFailed,
    DaemonUnavailable,
    DockerError,
    ImageMissing,
    Log,
    image_requirements,
    prepare_ort_headers,
    prepare_wheelhouse,
    source_root,
)
from capsbench.suite.env import git_commit
from capsbench.suite.errors import CapsbenchError

# ------------------------------------------------------------------------------------------------ the daemon


def client(base_url: str | None = None):
    """A DockerClient that has answered a ping: $DOCKER_HOST (or `base_url`), else the default socket."""
    try:
        import docker
    except ImportError as e:  # a dependency of the package; only a broken install lacks it
        raise DockerError("the docker Python SDK is missing: pip install 'docker>=7'") from e
    url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        c = docker.DockerClient(base_url=url, version="auto", timeout=300)
        c.ping()
    except Exception as e:  # DockerException, requests' ConnectionError, FileNotFoundError, ...
        raise DaemonUnavailable(
            f"no Docker daemon answers at {url} ({_one_line(e)}): start it (`sudo systemctl start docker`; "
            f"without systemd, as root: `dockerd --bridge=none --iptables=false &`) or point DOCKER_HOST at a "
            "running one"
        ) from None
    return c


def host_has_gpu() -> bool:
    """True when nvidia-smi lists at least one GPU (the NVIDIA driver is there)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def gpu_requests(gpus: str) -> list:
    """DeviceRequests for `--gpus`: all (every GPU), none, or auto (all when the host has a GPU)."""
    from docker.types import DeviceRequest

    if gpus not in ("auto", "all", "none"):
        raise DockerError(f"--gpus must be auto, all or none, got {gpus!r}")
    if gpus == "none" or (gpus == "auto" and not host_has_gpu()):
        return []
    return [DeviceRequest(count=-1, capabilities=[["gpu"]])]


# ---------------------------------------------------------------------------------------- what a build needs


def image_python(c, image: str) -> str | None:
    """'3.11' for an image whose python3 is 3.11; None when it has none."""
    import docker

    try:
        out = c.containers.run(
            image,
            ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            entrypoint=[],
            network_mode="none",
            remove=True,
        )
    except docker.errors.ImageNotFound:
        raise ImageMissing(f"image {image} not found (pull or build it first)") from None
    except docker.errors.DockerException:
        return None
    return out.decode().strip() or None


def image_exists(c, tag: str) -> bool:
    import docker

    try:
        c.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_base_image(
    c,
    tag: str = LOCAL_BASE,
    packages: Sequence[str] = BASE_PACKAGES,
    *,
    suite: str = DEBIAN_SUITE,
    mirror: str = DEBIAN_MIRROR,
    cache: Path = CACHE,
    log: Log = print,
) -> bool:
    """Make a Debian image `tag` with debootstrap (minbase + `packages`) and `docker import`, unless `tag`
    exists. Returns True when it was built. Needs root and debootstrap; the .debs are cached in `cache`."""
    if image_exists(c, tag):
        return False
    if os.geteuid() != 0:
        raise DockerError(f"building the base image {tag} with debootstrap needs root (or pass --base-image)")
    if not shutil.which("debootstrap"):
        raise DockerError("debootstrap is not installed: apt-get install debootstrap (or pass --base-image)")
    debs = cache / "debootstrap-debs"
    debs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}", f"--include={','.join(packages)}"]
        log(f"base image {tag}: debootstrap {suite} with {', '.join(packages)}")
        res = subprocess.run(
            [*cmd, suite, str(rootfs), mirror], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if res.returncode != 0:
            raise DockerError(f"debootstrap {suite} failed:\n{_tail(res.stdout, 8)}")
        repo, version = _split_tag(tag)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        archive = tar.stdout
        assert archive is not None, "stdout=PIPE gives the process a stdout pipe"
        try:
            c.api.import_image(
                src=iter(lambda: archive.read(1 << 20), b""),
                repository=repo,
                tag=version,
                changes=["ENV LANG=C.UTF-8"],
                stream_src=True,
            )
        finally:
            archive.close()
            tar.wait()
    log(f"base image {tag}: built in {time.perf_counter() - t0:.0f} s")
    return True


# --------------------------------------------------------------------------------------------------- building


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build_image(
    *,
    tag: str = DEFAULT_TAG,
    base_image: str | None = None,
    builder_image: str | None = None,
    wheelhouse: str | Path | None = None,
    offline: bool = False,
    torch: str = TORCH,
    ort: str = ORT_GPU,
    network: str | None = None,
    context: str | Path | None = None,
    nocache: bool = False,
    c=None,
    log: Log = print,
) -> str:
    """Build the capsbench image; returns its id. Progress (every Dockerfile step) goes to `log`.

    offline: no network during the build (network "none"): the local Debian base images unless `base_image`
    is given, a wheelhouse (filled with pip download unless `wheelhouse` holds one) and ONNX Runtime's headers
    are prepared on this host first. Otherwise the build uses the host's network ("host") and PyPI; the
    headers are still taken from this host when it can provision them.
    """
    c = c or client()
    root = source_root(context)
    network = network or ("none" if offline else "host")
    if network not in NETWORKS:
        raise DockerError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")

    if offline and base_image is None:
        ensure_base_image(c, LOCAL_BASE, BASE_PACKAGES, log=log)
        ensure_base_image(c, LOCAL_BUILDER, BUILDER_PACKAGES, log=log)
        base_image, builder_image = LOCAL_BASE, builder_image or LOCAL_BUILDER
    if network == "none":
        for image in filter(None, (base_image, builder_image)):
            if not image_exists(c, image):
                raise ImageMissing(
                    f"image {image} not found and an offline build cannot pull it: pull or build it first, or "
                    "leave --base-image out for the local Debian base"
                )
    args = {"TORCH": torch, "ORT": ort, "GIT_COMMIT": git_commit(root) or ""}
    if base_image:
        args["BASE_IMAGE"] = base_image
    if builder_image:
        args["BUILDER_IMAGE"] = builder_image

    if wheelhouse is not None or offline:
        wheels = root / WHEELS
        if wheelhouse is not None and Path(wheelhouse).absolute() != wheels:
            src = Path(wheelhouse)
            if not src.is_dir() or not any(src.glob("*.whl")):
                raise DockerError(f"--wheelhouse {src}: no .whl files there")
            shutil.rmtree(wheels, ignore_errors=True)
            shutil.copytree(src, wheels)
            log(f"wheelhouse: {src} -> {wheels}")
        else:
            source_image = builder_image or base_image
            python = image_python(c, source_image) if source_image else None
            prepare_wheelhouse(wheels, image_requirements(root, torch, ort), python, log=log)
        args["WHEELHOUSE"] = WHEELS.as_posix()
    try:
        prepare_ort_headers(root / ORT_HEADERS, log=log)
        args["ORT_HEADERS"] = ORT_HEADERS.as_posix()
    except CapsbenchError as e:
        if network == "none":
            raise DockerError(f"an offline build needs ONNX Runtime's headers on this host: {e}") from None
        log(
            f"ONNX Runtime headers not provisioned here ({e}); the build fetches them from the release archive"
        )

    log(
        f"building {tag} from {root} (network {network}; "
        + ", ".join(f"{k}={v}" for k, v in args.items())
        + ")"
    )
    # The builder stage is tagged too (<name>-builder), so its layers (the installed dependencies above all)
    # stay as cache; the images this build replaces are removed, so rebuilds do not pile up gigabytes.
    builder_tag = _builder_tag(tag)
    before = {t: _image_id(c, t) for t in (tag, builder_tag)}
    image_id, stages = _stream_build(c, root, tag, args, network, nocache, log)
    if stages:
        repo, version = _split_tag(builder_tag)
        c.api.tag(stages[0], repo, version)
    for t, old in before.items():
        if old and old != _image_id(c, t):
            with contextlib.suppress(docker_errors().APIError):  # still used by a container: keep it
                c.images.remove(old)
    return image_id


def docker_errors():
    import docker.errors

    return docker.errors


def _split_tag(tag: str) -> tuple[str, str]:
    if ":" not in tag.split("/")[-1]:
        return tag, "latest"
    repo, _, version = tag.rpartition(":")
    return repo, version


def _builder_tag(tag: str) -> str:
    repo, version = _split_tag(tag)
    return f"{repo}-builder:{version}"


def _image_id(c, tag: str) -> str | None:
    try:
        return c.images.get(tag).id
    except docker_errors().ImageNotFound:
        return None


_STEP = re.compile(r"^Step \d+/\d+ : FROM ")
_LAYER = re.compile(r"^ ---> ([0-9a-f]{12})$")


def _stream_build(
    c, root: Path, tag: str, args: dict, network: str, nocache: bool, log: Log
) -> tuple[str, list[str]]:
    """Run the build, logging its output; returns the image id and the ids of the stages before the last."""
    t0 = time.perf_counter()
    image_id: str | None = None
    last: list[str] = []  # the last lines of output, shown when the build fails
    layer: str | None = None
    stages: list[str] = []
    try:
        chunks = c.api.build(
            path=str(root),
            tag=tag,
            buildargs=args,
            network_mode=network,
            rm=True,
            forcerm=True,
            pull=False,
            nocache=nocache,
            decode=True,
        )
        for chunk in chunks:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise BuildFailed(
                    f"docker build of {tag} failed: {detail.strip()}\n{_tail(''.join(last), 15)}"
                )
            if "stream" in chunk:
                text = chunk["stream"]
                last = (last + [text])[-40:]
                for line in text.splitlines():
                    if _STEP.match(line) and layer:
                        stages.append(layer)  # the previous stage ended with this image
                    if m := _LAYER.match(line):
                        layer = m.group(1)
                    if line.strip() and not line.startswith(
                        ("Removing intermediate container", " ---> Running in")
                    ):
                        log(line.rstrip())
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
    except docker_errors().APIError as e:
        raise BuildFailed(f"docker build of {tag} failed: {_one_line(e)}") from None
    if image_id is None:
        image_id = c.images.get(tag).id
    log(f"built {tag} ({image_id[:19]}) in {time.perf_counter() - t0:.0f} s")
    return image_id, stages


# ---------------------------------------------------------------------------------------------------- running


def data_mount_mode(args: Sequence[str]) -> str:
    """The datasets are mounted read-only: a benchmark only reads them (and verifies their checksums), so nothing
    in the container can alter the host's data. Only `capsbench data ...` (fetching into it) gets them writable."""
    return "rw" if list(args)[:1] == ["data"] else "ro"


def run_container(
    args: Sequence[str],
    *,
    image: str = DEFAULT_TAG,
    gpus: str = "auto",
    data_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    network: str = "none",
    user: str | None = None,
    env: dict[str, str] | None = None,
    c=None,
    out=None,
    log: Log = print,
) -> int:
    """Run `capsbench ARGS` in the image; its output is streamed to `out` (default stdout). Returns the exit code.

    Datasets: `data_dir` (default: the host's data folder) at /data; results: `runs_dir` at /runs, which is the
    container's `runs/`, so `runs/<run-id>/...` lands in the same place as on the host. The container runs as
    `user` (default: the calling user's uid:gid), so the files it writes belong to that user; network "none"
    unless "host" is asked for, never the default bridge.
    """
    import docker

    from capsbench.suite.data import resolve_data_dir

    if network not in NETWORKS:
        raise DockerError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    c = c or client()
    if not image_exists(c, image):
        raise ImageMissing(f"image {image!r} not found: run `capsbench docker build` (or --tag it) first")
    data = Path(data_dir) if data_dir is not None else resolve_data_dir(None)
    runs = Path(runs_dir)
    for d in (data, runs):
        d.mkdir(parents=True, exist_ok=True)  # by this user: docker would make them root's
    devices = gpu_requests(gpus)
    user = user or f"{os.getuid()}:{os.getgid()}"
    log(
        f"docker run {image} capsbench {' '.join(args)}  (gpus: {'all' if devices else 'none'}, network {network}, "
        f"user {user}, data {data.absolute()} -> /data ({data_mount_mode(args)}), runs {runs.absolute()} -> /runs)"
    )
    container = None
    try:
        container = c.containers.create(
            image,
            list(args),
            network_mode=network,
            user=user,
            device_requests=devices or None,
            volumes={
                str(data.absolute()): {"bind": "/data", "mode": data_mount_mode(args)},
                str(runs.absolute()): {"bind": "/runs", "mode": "rw"},
            },
            environment=env or {},
            shm_size="1g",  # torch's shared-memory tensors; docker's default is 64 MB
            init=True,  # signals reach capsbench, zombies are reaped
        )
        container.start()
    except docker.errors.APIError as e:
        if container is not None:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True, v=True)
        msg = _one_line(e)
        if devices and ("device driver" in msg or "nvidia" in msg.lower()):
            raise DockerError(
                f"the GPU request failed ({msg}): install the NVIDIA Container Toolkit and restart dockerd, "
                "or run with --gpus none"
            ) from None
        raise DockerError(f"docker run failed: {msg}") from None
    stream = out or sys.stdout.buffer
    try:
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            stream.write(chunk)
            stream.flush()
        return int(container.wait().get("StatusCode", 1))
    except KeyboardInterrupt:
        container.stop(timeout=10)
        raise
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(force=True, v=True)

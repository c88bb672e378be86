"""`capsbench docker`: build the image and run capsbench in it, through the docker SDK.

`docker build [--offline]` streams the build's progress; `docker run [--gpus auto|all|none] -- ARGS` streams
the container's output and leaves the results in the host's runs folder, owned by the calling user.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capsbench.suite import docker as dk


def register(sub) -> None:
    p = sub.add_parser(
        "docker",
        help="build the container image and run capsbench in it",
        description="Build the capsbench image (Dockerfile at the top of the checkout) and run capsbench in "
        "it with the datasets and the runs folder of this host mounted. Needs a running Docker daemon "
        "($DOCKER_HOST or the default socket).",
        epilog="Run 'capsbench docker build --help' or 'capsbench docker run --help' for their options.",
    )
    docker_sub = p.add_subparsers(dest="docker_command", metavar="ACTION", required=True)

    b = docker_sub.add_parser(
        "build",
        help="build the image, with progress",
        description="Build the image. By default on NVIDIA's CUDA 13 + cuDNN 9 runtime image, with torch and "
        "onnxruntime-gpu from PyPI (needs the network, used as 'host'). --offline builds with no network at "
        "all: it first makes local Debian base images with debootstrap (as root; cached by tag), fills a "
        "wheelhouse in build/docker/wheels with this host's pip, and copies ONNX Runtime's headers into "
        "build/docker/.",
    )
    b.add_argument("--tag", default=dk.DEFAULT_TAG, help="image name (default: %(default)s)")
    b.add_argument(
        "--base-image",
        default=None,
        metavar="IMG",
        help="runtime base image (default: the Dockerfile's CUDA image; with --offline the local Debian one)",
    )
    b.add_argument(
        "--builder-image",
        default=None,
        metavar="IMG",
        help="image the runner is compiled in, with the base image's python3 (default: the base image, "
        "with cmake and g++ from apt; with --offline the local Debian one that has them)",
    )
    b.add_argument(
        "--wheelhouse",
        type=Path,
        default=None,
        metavar="DIR",
        help="install from the wheels in DIR only (copied into the build context), no index",
    )
    b.add_argument(
        "--offline", action="store_true", help="build with network 'none' from local images and a wheelhouse"
    )
    b.add_argument("--torch", default=dk.TORCH, help="torch requirement (default: %(default)s)")
    b.add_argument(
        "--ort",
        default=dk.ORT_GPU,
        help="ONNX Runtime requirement (default: %(default)s; 'onnxruntime' for a smaller CPU-only image)",
    )
    b.add_argument(
        "--network",
        choices=dk.NETWORKS,
        default=None,
        help="build network (default: none offline, else host)",
    )
    b.add_argument("--context", type=Path, default=None, help="the checkout to build (default: this one)")
    b.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    b.set_defaults(func=run_build)

    r = docker_sub.add_parser(
        "run",
        help="run capsbench in the image",
        description="Run 'capsbench ARGS' in the image, e.g. 'capsbench docker run -- all --preset smoke'. "
        "DIR of --data is mounted at /data (CAPSBENCH_DATA there) and DIR of --runs at /runs, the container's "
        "runs/ folder, so results land where a run on this host puts them. The container runs as your "
        "uid:gid, with network 'none' unless --network host; its exit code is this command's.",
    )
    r.add_argument("--image", default=dk.DEFAULT_TAG, help="image to run (default: %(default)s)")
    r.add_argument(
        "--gpus",
        choices=("auto", "all", "none"),
        default="auto",
        help="pass every GPU in (all), none, or all when nvidia-smi sees one (auto, the default)",
    )
    r.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="datasets folder (default: $CAPSBENCH_DATA, else ~/.cache/capsbench/data)",
    )
    r.add_argument(
        "--runs", type=Path, default=Path("runs"), metavar="DIR", help="results folder (default: ./runs)"
    )
    r.add_argument("--network", choices=dk.NETWORKS, default="none", help="container network (default: none)")
    r.add_argument("--user", default=None, help="UID:GID to run as (default: yours)")
    r.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable (repeatable)",
    )
    r.add_argument(
        "capsbench_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="the capsbench command line to run (default: --help)",
    )
    r.set_defaults(func=run_run)


def run_build(args: argparse.Namespace) -> int:
    dk.build_image(
        tag=args.tag,
        base_image=args.base_image,
        builder_image=args.builder_image,
        wheelhouse=args.wheelhouse,
        offline=args.offline,
        torch=args.torch,
        ort=args.ort,
        network=args.network,
        context=args.context,
        nocache=args.no_cache,
        log=lambda line: print(line, flush=True),
    )
    return 0


def run_run(args: argparse.Namespace) -> int:
    rest = list(args.capsbench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise dk.DockerError(f"--env needs KEY=VALUE, got {item!r}")
        env[key] = value
    return dk.run_container(
        rest or ["--help"],
        image=args.image,
        gpus=args.gpus,
        data_dir=args.data,
        runs_dir=args.runs,
        network=args.network,
        user=args.user,
        env=env,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )

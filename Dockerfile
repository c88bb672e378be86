# capsbench in a container: `docker run --gpus all capsbench all` (or `capsbench docker build` / `docker run`).
#
# BASE_IMAGE: the runtime image. The default is NVIDIA's CUDA 13 runtime with cuDNN 9 on Ubuntu 24.04: what
# onnxruntime-gpu 1.31 from PyPI is built for (its CUDA provider needs libcudart.so.13, libcublasLt.so.13 and
# cuDNN 9; read off the wheel's libonnxruntime_providers_cuda.so). torch's CUDA wheels bring their own CUDA
# libraries. The host needs an NVIDIA driver for CUDA 13 (>= 580) and the NVIDIA Container Toolkit.
# Any Debian/Ubuntu image with python3 works too: CI builds on a local Debian 12 image made with debootstrap
# (`capsbench docker build --offline`), since no registry for images is reachable there.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# BUILDER_IMAGE: where the C++ runner is compiled and the venv is made. It must have the same python3 as
# BASE_IMAGE (the venv is copied across). Default: BASE_IMAGE itself, with cmake and g++ from apt (needs the
# network); offline builds pass an image that already has them (debootstrap --include=cmake,g++,make).
ARG BUILDER_IMAGE=${BASE_IMAGE}

# ------------------------------------------------------------------------------------------------------ builder
FROM ${BUILDER_IMAGE} AS builder
# WHEELHOUSE: a folder of wheels inside the build context (e.g. build/docker/wheels): install from it alone,
# with no index (offline builds). Empty: pip installs from PyPI.
ARG WHEELHOUSE=
# ORT_HEADERS: a folder inside the build context holding ONNX Runtime's C/C++ headers (onnxruntime_cxx_api.h, ...)
# for the C++ runner. Empty: the headers of the installed onnxruntime version are fetched from its official
# release archive (needs the network).
ARG ORT_HEADERS=
# TORCH: torch's requirement, installed first so nothing else can pull another build. The wheelhouse of CI holds
# the CPU wheel; from PyPI this is its default (CUDA) build. TORCH_INDEX_URL picks another index, e.g.
# https://download.pytorch.org/whl/cu130 for the build on the base image's CUDA 13.0.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=
# ORT: the ONNX Runtime distribution that replaces pyproject's onnxruntime-gpu requirement. onnxruntime-gpu also
# runs the CPU provider; CI builds with the CPU-only `onnxruntime` (a 17 MB wheel instead of 250 MB).
ARG ORT=onnxruntime-gpu==1.31.1

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Tools from apt only when the image lacks them (the CUDA images have no python3, cmake or g++).
RUN if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null || ! command -v make >/dev/null \
        || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv cmake g++ make \
        ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# Dependencies first (their layer is cached while only the sources change): torch, then pyproject's list with
# onnxruntime-gpu replaced by $ORT, and setuptools to build the package below without build isolation.
# An empty WHEELHOUSE copies a stand-in file: COPY needs a source.
COPY ${WHEELHOUSE:-.dockerignore} /tmp/wheels/
COPY pyproject.toml /tmp/pyproject.toml
RUN set -e; \
    if [ -n "$WHEELHOUSE" ]; then from="--no-index --find-links /tmp/wheels"; else from=""; fi; \
    if [ -n "$TORCH_INDEX_URL" ] && [ -z "$WHEELHOUSE" ]; then torch_from="--index-url $TORCH_INDEX_URL"; \
    else torch_from="$from"; fi; \
    /opt/venv/bin/python -m pip install $torch_from "$TORCH"; \
    /opt/venv/bin/python -c 'import sys, tomllib; \
deps = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]; \
print("\n".join([d for d in deps if not d.startswith(("onnxruntime", "torch"))] + [sys.argv[1], "setuptools>=68"]))' \
        "$ORT" > /tmp/requirements.txt; \
    /opt/venv/bin/python -m pip install $from -r /tmp/requirements.txt "$TORCH"; \
    rm -rf /tmp/wheels

# The C++ runner, linked against the venv's own libonnxruntime: provision_ort.sh makes an ONNX Runtime root of
# symlinks into the venv (lib/) beside the headers (include/), and CMake records that lib/ as the runner's rpath,
# so the binary finds the library in the final image, where the venv has the same path.
COPY ${ORT_HEADERS:-.dockerignore} /tmp/ort-include/
COPY export/cpp /tmp/cpp
RUN set -e; \
    ort=/opt/venv/onnxruntime; mkdir -p $ort; \
    if [ -f /tmp/ort-include/onnxruntime_cxx_api.h ]; then \
        cp -r /tmp/ort-include $ort/include; \
    else \
        /opt/venv/bin/python -c 'import io, sys, tarfile, urllib.request; \
import onnxruntime; v = onnxruntime.__version__; \
url = f"https://github.com/microsoft/onnxruntime/releases/download/v{v}/onnxruntime-linux-x64-{v}.tgz"; \
print("fetching ONNX Runtime headers from", url); \
t = tarfile.open(fileobj=io.BytesIO(urllib.request.urlopen(url, timeout=120).read())); \
ms = [m for m in t.getmembers() if m.isfile() and "/include/" in m.name]; \
[setattr(m, "name", m.name.split("/include/", 1)[1]) for m in ms]; \
t.extractall(sys.argv[1], members=ms)' $ort/include; \
    fi; \
    rm -rf /tmp/ort-include; \
    PYTHON=/opt/venv/bin/python bash /tmp/cpp/provision_ort.sh $ort; \
    cmake -S /tmp/cpp -B /tmp/cpp-build -DONNXRUNTIME_ROOT=$ort -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release; \
    cmake --build /tmp/cpp-build --parallel "$(nproc)"; \
    install -m 755 /tmp/cpp-build/capsbench-runner /opt/venv/bin/capsbench-runner; \
    rm -rf /tmp/cpp /tmp/cpp-build

# The package itself, last: a source change rebuilds only these layers. The folders one by one (COPY of several
# folders merges their contents), so the wheelhouse in build/docker/ is not copied again.
COPY pyproject.toml README.md /tmp/src/
COPY capsbench /tmp/src/capsbench
COPY suite /tmp/src/suite
COPY models /tmp/src/models
COPY export /tmp/src/export
COPY reports /tmp/src/reports
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src

# -------------------------------------------------------------------------------------------------------- final
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# python3 only (no compilers): the venv's interpreter is a symlink to it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi

# A non-root user (uid 1000; Ubuntu's images already have one, `ubuntu`, which makes way). `capsbench docker run`
# runs as the calling user's uid:gid instead, so results on the host belong to them: HOME and the working
# folder are therefore writable by any uid.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel -r ubuntu 2>/dev/null || userdel ubuntu; fi; \
    useradd --create-home --uid 1000 --user-group --shell /bin/sh capsbench \
    && mkdir -p /data /runs /work \
    && ln -s /runs /work/runs \
    && chown capsbench:capsbench /data /runs \
    && chmod 1777 /home/capsbench /work

COPY --from=builder /opt/venv /opt/venv

# One line on stderr whenever the suite will run on the CPU: no GPU passed in (`--gpus all` missing; and whether
# the image could use one), or GPUs passed in to an image that cannot use them (a CPU-only torch or onnxruntime:
# built with another TORCH/ORT). /etc/capsbench-cuda-missing, written here at build time, says what
# of the image lacks CUDA (empty: both torch and ONNX Runtime are CUDA builds). A GPU is passed in when the
# NVIDIA device nodes are there (/dev/nvidiactl or /dev/nvidia0, ...).
RUN /opt/venv/bin/python -c 'import onnxruntime as o, torch; \
m = [] if torch.version.cuda else [f"torch {torch.__version__} is a CPU-only build"]; \
m += [] if "CUDAExecutionProvider" in o.get_available_providers() else [f"onnxruntime {o.__version__} has no CUDA provider"]; \
print("; ".join(m))' > /etc/capsbench-cuda-missing \
    && printf '%s\n' '#!/bin/sh' \
        'case "${1:-}" in ""|-h|--help|--version) exec /opt/venv/bin/capsbench "$@";; esac' \
        'gpu=no; for d in /dev/nvidiactl /dev/nvidia[0-9]*; do [ -e "$d" ] && gpu=yes; done' \
        'missing=$(cat /etc/capsbench-cuda-missing 2>/dev/null)' \
        'if [ "$gpu" = no ]; then' \
        '  echo "capsbench: no GPU in this container (start it with --gpus all for CUDA): running on the CPU${missing:+; this image is CPU-only too ($missing)}" >&2' \
        'elif [ -n "$missing" ]; then' \
        '  echo "capsbench: a GPU was passed in, but this image cannot use it ($missing): running on the CPU" >&2' \
        'fi' \
        'exec /opt/venv/bin/capsbench "$@"' > /usr/local/bin/capsbench-entrypoint \
    && chmod 755 /usr/local/bin/capsbench-entrypoint \
    && sh -n /usr/local/bin/capsbench-entrypoint \
    && /opt/venv/bin/capsbench-runner --help >/dev/null \
    && /opt/venv/bin/python -c "import capsbench.suite.cli, torch, onnxruntime"

# Declared late: a new commit changes only the layers below.
ARG GIT_COMMIT=
LABEL org.opencontainers.image.title="capsbench" \
      org.opencontainers.image.description="Benchmark suite for deep Capsule Networks" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
# Datasets in /data; results in /runs (the default `runs/` of the working folder /work points there).
# CAPSBENCH_RUNNER: the C++ runner built above (no compiler in this image to build another).
ENV PATH=/opt/venv/bin:$PATH \
    CAPSBENCH_DATA=/data \
    CAPSBENCH_RUNNER=/opt/venv/bin/capsbench-runner \
    CAPSBENCH_GIT_COMMIT=${GIT_COMMIT} \
    HOME=/home/capsbench \
    PYTHONUNBUFFERED=1
VOLUME ["/data", "/runs"]
WORKDIR /work
USER capsbench
ENTRYPOINT ["/usr/local/bin/capsbench-entrypoint"]
CMD ["--help"]

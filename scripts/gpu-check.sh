#!/usr/bin/env bash
# Every CUDA check of capsbench in one call: the cuda-marked tests, then the CUDA figures of the quick preset's
# net (training images/s; ONNX Runtime CUDA with IOBinding and CUDA graphs vs torch eager and torch.compile at
# batch 1 and 64; node placement; first-run time) into one JSON file (default gpu-check.json).
#
#   scripts/gpu-check.sh [--wheels DIR] [--out FILE] [--allow-cpu] [--skip-tests] [...]   (--help: all options)
#
# Without a CUDA GPU it exits 2 with one line; --allow-cpu measures the same on CPU and writes "cuda": false.
#
# A GPU machine without a package registry: carry the wheels it lacks in a folder and pass --wheels DIR.
# They are installed with --no-index --no-deps (the machine's own torch stays). Fill DIR where pip works, for
# the GPU machine's Python (here 3.12) and platform, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       -d DIR 'onnxruntime-gpu>=1.22,<1.33'
# and any of capsbench's other requirements that `pip show` says are missing there (docker, tqdm, ...). Where
# a transfer limits file sizes, `split -b 60M` a wheel and join the parts there with `cat` before the call.
# The data: Fashion-MNIST in ~/.cache/capsbench/data (or --data-dir); `capsbench data fetch` copies it from
# Debian's dataset-fashion-mnist package, or carry the four *-ubyte.gz files.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

if [ -n "${WHEELS:-}" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    [ ${#wheels[@]} -gt 0 ] || { echo "gpu-check: no *.whl in $WHEELS" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "${wheels[@]}"
fi

# From a source checkout where capsbench is not installed (a bare GPU machine): install it in place, offline.
if ! "$PY" -c "import capsbench.suite" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
        { echo "gpu-check: could not install capsbench from $(pwd) (needs setuptools>=68)" >&2; exit 2; }
fi

exec "$PY" -m capsbench.suite.gpucheck ${args[@]+"${args[@]}"}

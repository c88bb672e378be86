#!/usr/bin/env bash
# Every CUDA check of capsbench in one call, each step under its own timeout and the whole within --budget
# (default 600 s): the cuda-marked tests (pytest -m cuda: ORT CUDA, IOBinding, CUDA graphs, the C++ runner's
# --io-binding and --cuda-graph, training); the quick preset's net trained (images/s); its training step in fp32,
# bf16 and torch.compile reduce-overhead; ONNX Runtime CUDA with IOBinding and CUDA graphs vs torch eager and
# torch.compile at batch 1 and 64 with node placement; the C++ runner on CUDA (IOBinding, CUDA graphs) beside
# Python ORT; the time and cpp stages end to end on the smoke preset. One JSON file (default gpu-check.json)
# holds every figure, every step's status and every problem.
#
#   scripts/gpu-check.sh [--wheels DIR] [--out FILE] [--allow-cpu] [--skip-tests] [...]   (--help: all options)
#
# Without a CUDA GPU it exits 2 with one line; --allow-cpu measures the same on CPU and writes "cuda": false.
#
# A GPU machine without a package registry: scripts/gpu-bundle.sh makes, where pip works, a bundle of what it
# lacks (onnxruntime-gpu for its CUDA major and Python, capsbench's other missing wheels, ONNX Runtime's headers,
# Fashion-MNIST, this checkout) in parts of a chosen size; `bash join.sh` there joins and verifies them, installs
# offline and runs this check. Or carry the wheels in a folder and pass --wheels DIR: they are installed with
# --no-index --no-deps (the machine's own torch stays).
# The data: Fashion-MNIST in ~/.cache/capsbench/data (or --data-dir).
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

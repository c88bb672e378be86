#!/usr/bin/env bash
# Set up capsbench on a fresh machine: a virtual environment in .venv, torch, the package with its dev tools and Ray,
# and the default dataset (Fashion-MNIST), verified. Safe to rerun; each step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch goes in first and pinned, so no other requirement can pull a different (multi-GB CUDA) build.
# On the project's machines 2.13.0 is a CPU wheel on disk; elsewhere pip takes PyPI's build of that version.
TORCH_SPEC=${CAPSBENCH_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[dev,ray]'  # ray: --executor ray and its tests

# Fashion-MNIST: Debian's dataset-fashion-mnist package holds the original files; `capsbench data fetch`
# copies and verifies them (or downloads from the canonical address where the network allows).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
.venv/bin/capsbench data fetch fashion-mnist

# Build and test tools from Debian, when missing and we may install them: cmake and g++ for the C++ runner
# (export/cpp), Chromium for the report's browser test (driven by Playwright, no browser download).
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "capsbench installed: .venv/bin/capsbench --help"

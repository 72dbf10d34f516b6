#!/usr/bin/env bash
# Download, on a machine with network, the wheels that bench/gpu_check.sh installs on a GPU machine without
# network (one that has python, torch, triton, pytest and pytest-benchmark, but maybe not PML's own imports):
#
#   bash bench/fetch_wheels.sh [DIR] [PYTHON_VERSION]     (default: .whl beside bench/, Python 3.12)
#
# pytorch-metric-learning imports numpy, scipy and tqdm (its losses, miners, distances and reducers need
# nothing else); hypothesis (with sortedcontainers) runs the property tests. gpu_check.sh installs only the
# ones the GPU machine lacks, so an extra wheel here is harmless. torch is never downloaded (no --deps).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# pure-python wheels: any platform
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    "pytorch-metric-learning==2.9.0" tqdm sortedcontainers
# compiled wheels (recent hypothesis releases are compiled too): CPython $PYV on x86_64 Linux
# (manylinux_2_28 also accepts the older manylinux tags)
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64 \
    "numpy<2.4" scipy hypothesis
ls -l "$DIR"

#!/usr/bin/env bash
# Download, on a machine with network, the wheels that bench/gpu_check.sh installs on the offline GPU
# machine (torch 2.11, Triton 3.6, Python 3.12, numpy 2.5, scipy, scikit-learn, tqdm, pytest, hypothesis
# already there):
#
#   bash bench/fetch_wheels.sh [DIR]        (default: .whl in the repository root, which git ignores)
#
# The image lacks only pytorch-metric-learning (PML 2.9.0 imports numpy, scikit-learn, tqdm and torch, all in
# the image). gpu_check.sh installs a wheel only when the machine lacks its distribution, so an extra wheel
# is harmless; torch is never downloaded (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "pytorch-metric-learning==2.9.0"
ls -l "$DIR"

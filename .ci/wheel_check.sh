#!/usr/bin/env bash
# The built package, used as a user would: the sdist and the wheel (python -m build, the wheel built from the
# sdist), the wheel installed into a fresh virtual environment outside the source tree (torch==2.13.0 from
# the local disk), then, from a directory outside the checkout: `python -m fastdml` (CPU, and the Triton
# kernels under the interpreter) and a smoke subset of the tests against the installed package.
#
#   bash .ci/wheel_check.sh [PYTHON]      (PYTHON: the one that has `build`; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY=${1:-$SRC/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdml_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# the smoke subset: dispatch and the device table, the compiled C helpers built from the shipped sources (the
# kernels through the public API are the `--interpret` self-check below)
SMOKE=(test_dispatch.py test_dispatch_devices.py test_blocked_native.py)

t0=$SECONDS
"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/fastdml-*.whl)
# what the wheel must contain besides the Python modules
"$PY" -m zipfile -l "$WHEEL" >"$WORK/wheel_files.txt"
for f in fastdml/py.typed fastdml/kernels/__init__.py fastdml/blocked/csrc/row_scan.c \
    fastdml/blocked/csrc/chosen_triplets.c fastdml/blocked/csrc/fastdml_native.h fastdml/__main__.py \
    fastdml/losses/__init__.py fastdml/miners/__init__.py fastdml/portable/__init__.py; do
    grep -q "^$f " "$WORK/wheel_files.txt" || { echo "the wheel lacks $f"; exit 1; }
done
echo "build: $((SECONDS - t0)) s"

t0=$SECONDS
python3 -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "$WHEEL" pytest pytest-timeout
echo "install: $((SECONDS - t0)) s"

# from outside the checkout: the installed package, never the source tree
mkdir -p "$WORK/run/tests"
cd "$WORK/run"
export FASTDML_CACHE_DIR="$WORK/native_cache"  # an empty cache: the helpers build from the wheel's sources
"$VPY" - "$SRC" <<'EOF'
import os, sys, sysconfig
import fastdml, fastdml.kernels
site = os.path.realpath(sysconfig.get_paths()["purelib"])
src = os.path.realpath(sys.argv[1])
for mod in (fastdml, fastdml.kernels):
    path = os.path.realpath(mod.__file__)
    assert path.startswith(site + os.sep), f"{mod.__name__} imported from {path}, not from {site}"
    assert not path.startswith(src + os.sep), f"{mod.__name__} imported from the checkout: {path}"
typed = os.path.join(os.path.dirname(fastdml.__file__), "py.typed")
assert os.path.exists(typed), "py.typed is not installed"
print("installed package:", os.path.dirname(fastdml.__file__))
# the compiled helpers build from the installed C sources wherever a compiler exists
import shutil
from fastdml.blocked import native
if shutil.which(os.environ.get("CC", "cc").split()[0]):
    assert native.enabled(), f"the compiled helpers did not build from the wheel: {native.status()}"
print("native helpers:", native.status())
EOF

t0=$SECONDS
"$VPY" -m fastdml --device cpu --json "$WORK/run/selfcheck.json"
echo "python -m fastdml: $((SECONDS - t0)) s"
t0=$SECONDS
"$WORK/venv/bin/fastdml" --device cpu --interpret --cases ContrastiveLoss,BatchHardTripletLoss,SemiHardTripletLoss,Miner
echo "fastdml --interpret (the console script): $((SECONDS - t0)) s"

# the smoke tests: copies of the chosen files and their helpers in a package `tests` here (tests/__init__.py
# would otherwise make pytest import the checkout); the first test asserts where fastdml comes from
t0=$SECONDS
cp "$SRC"/tests/__init__.py "$SRC"/tests/conftest.py "$SRC"/tests/*_cases.py "$SRC"/tests/label_patterns.py tests/
for f in "${SMOKE[@]}"; do cp "$SRC/tests/$f" tests/; done
cat >tests/test_0_installed.py <<EOF
import os
import sysconfig

import fastdml


def test_fastdml_is_the_installed_package():
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    path = os.path.realpath(fastdml.__file__)
    assert path.startswith(site + os.sep), path
    assert not path.startswith(os.path.realpath("$SRC") + os.sep), path
EOF
"$VPY" -m pytest -q -p no:cacheprovider --rootdir "$WORK/run" tests
echo "smoke tests: $((SECONDS - t0)) s"

#!/usr/bin/env bash
# The Triton kernel tests (interpreter) under Triton 3.6, the GPU image's version, in a second environment:
# torch==2.13.0 (CPU build from the local disk), triton 3.6.*, numpy < 2.4 (numpy >= 2.4 needs triton >= 3.8
# under TRITON_INTERPRET=1). The checkout's fastdml is imported (the tests' rootdir is on sys.path).
#
#   bash .ci/triton36.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdml_triton36.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

t0=$SECONDS
python3 -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q torch==2.13.0 "triton==3.6.*" "numpy<2.4" pytest pytest-timeout
"$VPY" - <<'PYEOF'
import numpy, torch, triton
assert triton.__version__.startswith("3.6."), triton.__version__
print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)
PYEOF
echo "install: $((SECONDS - t0)) s"

t0=$SECONDS
# -p no:cacheprovider: nothing written into the checkout
# (-W: Triton 3.6's interpreter converts arrays to scalars the way numpy deprecates, thousands of times)
TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/test_kernels_*.py "$@"
echo "kernel tests under Triton 3.6: $((SECONDS - t0)) s"

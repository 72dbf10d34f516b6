#!/usr/bin/env bash
# One-shot GPU check for an H200 machine without network (python 3.12, torch, triton, pytest preinstalled).
#
#   bash bench/gpu_check.sh OUTDIR        (from anywhere; about 8 minutes at most)
#
# Steps, each under its own time limit so that one failure or hang cannot lose the others' output:
#   1. environment: nvidia-smi, versions; PML from .whl/ beside the project if present
#   2. the kernel tests compiled for the GPU: pytest -m "cuda or not cuda" tests/test_kernels_*.py
#      (TRITON_INTERPRET=0: tests/conftest.py only sets a default, so the explicit 0 wins)
#   3. the rest of the test suite on CUDA, with what is left of its time limit
#   4. the timing table: bench/gpu_timing.py (fastdml vs PML vs the GEMM floor, peak memory)
# Outputs in OUTDIR: env.txt, pytest_kernels.log/.xml, pytest_all.log/.xml, timing.log, timing.json,
# timing.md, summary.txt.
set -u
OUT=${1:-bench/out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 \
        || echo "pip install of .whl/ failed (see pip.log)" >>"$OUT/summary.txt"
    export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi

# limits (seconds) that add up to about 8 minutes on an H200
T_KERNEL_TESTS=${T_KERNEL_TESTS:-150}
T_ALL_TESTS=${T_ALL_TESTS:-60}
T_TIMING=${T_TIMING:-120}
T_BENCH=${T_BENCH:-150}

{
    date -u
    nvidia-smi 2>&1 | head -20
    $PY - <<'EOF' 2>&1
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import pytorch_metric_learning as p
    print("pml", p.__version__)
except Exception as e:
    print("pml missing:", e)
EOF
} >"$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

step pytest_kernels "$T_KERNEL_TESTS" $PY -m pytest -q -m "cuda or not cuda" -p no:cacheprovider \
    --junitxml="$OUT/pytest_kernels.xml" --durations=15 tests/test_kernels_*.py

step pytest_all "$T_ALL_TESTS" $PY -m pytest -q --maxfail=25 -m "cuda or not cuda" -p no:cacheprovider \
    --junitxml="$OUT/pytest_all.xml" --ignore-glob='tests/test_kernels_*' --ignore=tests/test_demo.py tests

step timing "$T_TIMING" $PY bench/gpu_timing.py --out "$OUT" --budget-s $((T_TIMING - 40)) --case-s 45

# the pytest-benchmark suites on CUDA and their report (publish later here with
# `python -m bench.report --no-run --json OUTDIR/bench/bench.json`)
export FASTDML_BENCH_TIME_LIMIT_S=10
step bench_suites "$T_BENCH" $PY -m bench.report --device cuda --out "$OUT/bench" --no-publish \
    --sizes 1024,4096,16384 --labels random10 --modes fwdbwd --target-s 0.2 --budget-s $((T_BENCH - 40))

echo "outputs in $OUT:" && ls -l "$OUT"

#!/usr/bin/env bash
# The first GPU run, one shot: a fresh H100 or H200, offline, torch 2.11, Triton 3.6, Python 3.12.
#
#   bash bench/gpu_check.sh OUTDIR        (from anywhere; at most T_TOTAL = 360 s, machine start excluded)
#
# Steps, each under its own time limit (and all under T_TOTAL), so that one failure or hang cannot lose the
# others' output; pytest gets SIGINT at its limit and still writes its summary and junit XML:
#   1. wheels from .whl/ (bench/fetch_wheels.sh) that the machine lacks, installed offline into a temporary
#      folder; the environment (GPU, versions, commit) to env.txt
#   2. the CUDA tests: pytest -m cuda (tests/test_kernels_cuda.py: determinism, N = 65,536, triplet chunks,
#      oracles on the kernel's own picks, ieee and tf32x3)
#   3. parity and memory: bench/gpu_parity.py (fastdml on CUDA vs PML in float64, values and gradients, for
#      ieee and tf32x3; peak memory against the prediction from the real staging budget)
#   4. the self-check and timing table: python -m fastdml --precision ieee,tf32x3 --bench --sizes ... (the
#      one timing-table implementation, fastdml/benchmark.py)
# Exit status: non-zero when any step fails (a test, a parity or memory mismatch, the self-check).
# Outputs in OUTDIR: env.txt, pip.log, pytest_cuda.log/.xml, parity.log/.json/.md, selfcheck.log/.json/.md,
# summary.txt.
set -u
OUT=${1:-bench/out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
: >"$OUT/summary.txt"

# limits (seconds); the steps add up to T_TOTAL
T_TOTAL=${T_TOTAL:-360}
T_TESTS=${T_TESTS:-150}
T_PARITY=${T_PARITY:-70}
T_SELFCHECK=${T_SELFCHECK:-120}
SIZES=${SIZES:-256,1024,4096,16384,65536}
DEADLINE=$((SECONDS + T_TOTAL))
FAILED=0

# 1. wheels the machine lacks (offline: never an index), then the environment
TMPROOT=$(mktemp -d "${TMPDIR:-/tmp}/fastdml_gpu_check.XXXXXX")
SITE=$TMPROOT/site
mkdir -p "$SITE"
export PYTHONPATH=.:$SITE${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TMPROOT/triton_cache}
{
    shopt -s nullglob
    WHEELS=(.whl/*.whl)
    echo "${#WHEELS[@]} wheel(s) in .whl; target $SITE"
    if [ ${#WHEELS[@]} -gt 0 ]; then
        # only the distributions this python lacks (never shadow what the machine has: torch, numpy, ...)
        mapfile -t NEED < <($PY - "${WHEELS[@]}" <<'EOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    name = os.path.basename(path).split("-")[0]
    try:
        print(f"have {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(path)
EOF
        )
        echo "to install: ${NEED[*]:-(none)}"
        if [ ${#NEED[@]} -gt 0 ]; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${NEED[@]}" ||
                for w in "${NEED[@]}"; do $PY -m zipfile -e "$w" "$SITE" && echo "unpacked $w"; done
        fi
    fi
} >"$OUT/pip.log" 2>&1
{
    date -u
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '(no git)')"
    nvidia-smi 2>&1 | head -15
    $PY - <<'EOF' 2>&1
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", getattr(torch.version, "hip", None))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sms", p.multi_processor_count, "memory", p.total_memory)
for mod in ("triton", "numpy", "scipy", "pytorch_metric_learning", "pytest", "hypothesis"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{mod} missing: {type(e).__name__}: {e}")
from fastdml import config
print("fp32 precision default", config.fp32_precision())
EOF
} >"$OUT/env.txt" 2>&1
grep -E "^(torch|triton|device|pytorch_metric_learning|python|fp32)" "$OUT/env.txt" | tee -a "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: run within min(SECONDS, time left), log, record the exit status
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "$name: skipped (only $limit s left of T_TOTAL)" | tee -a "$OUT/summary.txt"
        FAILED=1
        return
    fi
    local t0=$SECONDS
    timeout -s INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && FAILED=1
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -4 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

# 2. the CUDA tests, under each precision the GPU run must judge
step pytest_cuda "$T_TESTS" $PY -m pytest -p no:cacheprovider -m cuda -q -rfE --durations=10 \
    --junitxml="$OUT/pytest_cuda.xml" tests

# 3. parity with PML and the memory predictions
step parity "$T_PARITY" $PY bench/gpu_parity.py --out "$OUT" --precision ieee,tf32x3 --sizes 1024,4096 \
    --budget-s $((T_PARITY - 15))

# 4. the self-check and the timing table (fastdml/benchmark.py)
step selfcheck "$T_SELFCHECK" $PY -m fastdml --precision ieee,tf32x3 --bench --sizes "$SIZES" \
    --json "$OUT/selfcheck.json" --markdown "$OUT/selfcheck.md" --budget-s $((T_SELFCHECK - 20)) --case-s 30

rm -rf "$TMPROOT"
echo "total $SECONDS s; failed=$FAILED; outputs in $OUT" | tee -a "$OUT/summary.txt"
exit $FAILED

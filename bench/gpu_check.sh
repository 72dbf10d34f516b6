#!/usr/bin/env bash
# One-shot GPU check for an H200 machine without network (python 3.12, torch, triton, pytest preinstalled).
#
#   bash bench/gpu_check.sh OUTDIR        (from anywhere; at most about 8 minutes: T_TOTAL)
#
# Steps, each under its own time limit (and all under T_TOTAL) so that one failure or hang cannot lose the
# others' output; pytest gets SIGINT at its limit, so it still writes its summary and junit XML:
#   1. environment: nvidia-smi, versions (python, torch, CUDA, triton, numpy, PML, ...), git commit; the
#      wheels in .whl/ (or ../.whl/) that the machine lacks, installed offline into a temporary folder
#      (bench/fetch_wheels.sh downloads them on a machine with network: PML and its imports numpy, scipy,
#      tqdm; hypothesis for the property tests)
#   2. the kernel tests compiled for the GPU, including the public API on CUDA tensors against the
#      reference: tests/test_kernels_*.py and the other files that use tests/kernel_cases.py, in three
#      parallel pytest processes (JIT compilation of the ~200 kernel variants is CPU-bound; one Triton
#      cache serves every step). TRITON_INTERPRET=0 (tests/conftest.py only sets a default); tests that
#      force the triton backend on CPU tensors skip themselves
#   3. the rest of the test suite (CPU paths on this machine's torch), with what is left of its time limit
#   4. the timing table: python -m fastdml --bench (fastdml vs PML vs the GEMM floor, peak memory)
#   5. the pytest-benchmark suites on CUDA and their report
# Everything is written to OUTDIR: env.txt, pip.log, pytest_kernels.log (+ pytest_kernels_{0,1,2}.log/.xml),
# pytest_all.log/.xml, timing.log/.json/.md, bench_suites.log, bench/, summary.txt.
# Dry run on a CPU machine: GPU_CHECK_INTERPRET=1 bash bench/gpu_check.sh OUTDIR (the kernel tests then run
# under the interpreter; the timing steps find no CUDA device and say so).
set -u
OUT=${1:-bench/out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export TRITON_INTERPRET=${GPU_CHECK_INTERPRET:-0}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
: >"$OUT/summary.txt"

# limits (seconds): the steps add up to T_TOTAL (about 8 minutes on an H200, set-up included)
T_TOTAL=${T_TOTAL:-470}
T_KERNEL_TESTS=${T_KERNEL_TESTS:-180}
T_ALL_TESTS=${T_ALL_TESTS:-45}
T_TIMING=${T_TIMING:-120}
T_BENCH=${T_BENCH:-110}
DEADLINE=$((SECONDS + T_TOTAL))

# 1. wheels the machine lacks (offline: never an index), then the environment
TMPROOT=$(mktemp -d "${TMPDIR:-/tmp}/fastdml_gpu_check.XXXXXX")
SITE=$TMPROOT/site
mkdir -p "$SITE"
export PYTHONPATH=.:$SITE${PYTHONPATH:+:$PYTHONPATH}
# one Triton cache for all steps (the timing reuses the tests' compilations), writable whatever HOME is
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TMPROOT/triton_cache}
WHEELS=()
for dir in ${WHEELS_DIR:-.whl ../.whl}; do
    for w in "$dir"/*.whl; do
        [ -e "$w" ] && WHEELS+=("$w")
    done
done
{
    echo "wheel folder(s): ${WHEELS_DIR:-.whl ../.whl}; ${#WHEELS[@]} wheel(s); target $SITE"
    if [ ${#WHEELS[@]} -gt 0 ]; then
        # the wheels whose distribution this python does not have yet (never shadow what the machine has)
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
            if ! $PY -m pip install --no-index --no-deps --no-warn-script-location --target "$SITE" "${NEED[@]}"; then
                # no pip (or it refused): a wheel is a zip; unpacking it is installing it for import purposes
                echo "pip failed: unpacking the wheels instead"
                for w in "${NEED[@]}"; do $PY -m zipfile -e "$w" "$SITE" && echo "unpacked $w"; done
            fi
        fi
    fi
} >"$OUT/pip.log" 2>&1 || echo "installing the wheels failed (see pip.log)" >>"$OUT/summary.txt"

{
    date -u
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '(no git)')"
    echo "host: $(hostname) cpus: $(nproc)"
    nvidia-smi 2>&1 | head -20
    $PY - <<'EOF' 2>&1
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
for mod in ("triton", "numpy", "scipy", "tqdm", "pytorch_metric_learning", "pytest", "pytest_benchmark",
            "hypothesis", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:
        print(f"{mod} missing: {type(e).__name__}: {e}")
try:
    from fastdml import kernels
    print("fastdml.kernels", kernels.__file__)
except Exception as e:
    print("fastdml.kernels does not import:", type(e).__name__, e)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | grep -E "^(torch|triton|device|pytorch_metric_learning|python|fastdml)" | tee -a "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: run within min(SECONDS, time left), log, record the exit status
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "$name: skipped ($limit s is too short: T_TOTAL spent or limit set below 15 s)" | tee -a "$OUT/summary.txt"
        return
    fi
    local t0=$SECONDS
    # SIGINT first: pytest then stops like on Ctrl-C and still writes its summary and junit XML
    timeout -s INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

# 2. kernels and the public API on CUDA; --continue-on-collection-errors: a module whose optional imports
# are missing (PML, hypothesis) fails alone instead of stopping the whole run
PYTEST=($PY -m pytest -p no:cacheprovider -m "cuda or not cuda" -rfE --continue-on-collection-errors)
export PY OUT
# the test files that run the kernels on CUDA: tests/test_kernels_*.py and any other that uses their helpers
KERNEL_FILES=$( (ls tests/test_kernels_*.py; grep -l "kernel_cases" tests/test_*.py) 2>/dev/null | sort -u | tr '\n' ' ')
export KERNEL_FILES
kernel_tests() {  # the kernel test files in 3 parallel pytest processes: JIT compilation is CPU-bound
    local files pids=() i k group
    read -r -a files <<<"$KERNEL_FILES"
    # job control: without it a background process starts with SIGINT ignored, and pytest could not be
    # stopped cleanly at the time limit; with it, each runs in its own process group, so the trap below
    # forwards the SIGINT that timeout sends here
    set -m
    for k in 0 1 2; do
        group=()
        for i in "${!files[@]}"; do [ $((i % 3)) -eq $k ] && group+=("${files[$i]}"); done
        [ ${#group[@]} -eq 0 ] && continue
        $PY -m pytest -p no:cacheprovider -m "cuda or not cuda" -rfE --continue-on-collection-errors -q \
            --durations=10 --junitxml="$OUT/pytest_kernels_$k.xml" "${group[@]}" >"$OUT/pytest_kernels_$k.log" 2>&1 &
        pids+=($!)
    done
    local rc=0
    # at the time limit: pass SIGINT on and keep waiting; the pytest processes then write their summaries
    # and junit XML. They are outside timeout's process group, so a watchdog kills any still alive 8 s later.
    trap 'rc=130; kill -INT "${pids[@]}" 2>/dev/null; (sleep 8; kill -KILL "${pids[@]}" 2>/dev/null) &' INT
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null; done  # again: a wait cut short by the signal
    for k in 0 1 2; do [ -f "$OUT/pytest_kernels_$k.log" ] && echo "group $k: $(tail -1 "$OUT/pytest_kernels_$k.log")"; done
    return $rc
}
export -f kernel_tests
step pytest_kernels "$T_KERNEL_TESTS" bash -c kernel_tests

# 3. the rest (CPU paths; whatever fits in its limit, names listed as they pass)
IGNORE=()
for f in $KERNEL_FILES; do IGNORE+=("--ignore=$f"); done
step pytest_all "$T_ALL_TESTS" "${PYTEST[@]}" -v --maxfail=25 --junitxml="$OUT/pytest_all.xml" \
    "${IGNORE[@]}" --ignore=tests/test_demo.py tests

# 4. the timing table (stops starting cases 40 s before its limit; each case is guarded by --case-s)
step timing "$T_TIMING" $PY -m fastdml --device cuda --no-check --bench --json "$OUT/timing.json" \
    --markdown "$OUT/timing.md" --budget-s $((T_TIMING - 40)) --case-s 45

# 5. the pytest-benchmark suites on CUDA and their report (publish later here with
# `python -m bench.report --no-run --json OUTDIR/bench/bench.json`)
export FASTDML_BENCH_TIME_LIMIT_S=10
step bench_suites "$T_BENCH" $PY -m bench.report --device cuda --out "$OUT/bench" --no-publish \
    --sizes 1024,4096,16384 --labels random10 --modes fwdbwd --target-s 0.2 --budget-s $((T_BENCH - 40))

rm -rf "$TMPROOT"
echo "total $SECONDS s; outputs in $OUT:" | tee -a "$OUT/summary.txt" && ls -l "$OUT"

"""Test set-up: the Triton interpreter (so kernels run on the CPU), a fixed seed, tolerances per dtype.

TRITON_INTERPRET must be set before any Triton kernel module is imported, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

try:  # numpy is optional: a GPU machine may have torch without it (bench/gpu_check.sh)
    import numpy as np  # noqa: E402
except ImportError:  # pragma: no cover - depends on the machine
    np = None
import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances from the arithmetic, stated once per dtype:
# float64: exact math, rounding ~1e-16 per op, sums of <= 1e6 terms -> 1e-9 relative.
# float32: ~6e-8 per op; GEMM-shaped sums over D <= 256 and tile reductions over N <= 512 -> 1e-4 relative,
#          1e-5 absolute (the parity target of docs/ARCHITECTURE.md).
# float16: inputs rounded to 11 bits (~5e-4), fp32 accumulation -> 1e-2.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}

# Tests that force the triton backend on CPU tensors: fastdml.dispatch allows that only under the interpreter
# (bench/gpu_check.sh runs with TRITON_INTERPRET=0; the public API on CUDA tensors is tests/test_kernels_api.py).
triton_on_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="forces the triton backend on CPU tensors: needs TRITON_INTERPRET=1 (CUDA: tests/test_kernels_api.py)",
)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    if np is not None:
        np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tol():
    return TOL


@pytest.fixture(params=["compiled", "torch-ops"])
def native_path(request):
    """Runs a blocked batch-hard test (mining, chosen-triplet loss) both ways: with the compiled helpers of
    fastdml/blocked/native.py (skipped where they cannot be built) and with the torch ops they replace."""
    from fastdml.blocked import native

    if request.param == "compiled" and not native.enabled():
        pytest.skip(f"compiled helpers: {native.status()}")
    with native.disabled(request.param == "torch-ops"):
        yield request.param

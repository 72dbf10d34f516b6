"""Shared inputs and checks of the Triton kernel tests (tests/test_kernels_*.py).

The kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) and
on CUDA tensors otherwise. Expected values always come from ``fastdml.reference`` evaluated in float64 on
the very values the kernel saw (the inputs rounded to the kernel's dtype), so the difference measures the
kernel's own arithmetic only.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastdml.kernels._common import interpreting

from fastdml import reference as ref

from .label_patterns import labels as _labels

INF = math.inf


def kernel_device() -> str | None:
    """Where the kernels run in this session: "cpu" under the interpreter, "cuda" on a GPU, else None."""
    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return None


DEVICE = kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
# CUDA-only tests carry both marks: @pytest.mark.cuda (selected by bench/gpu_check.sh) and @cuda_only
cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(), reason="needs a CUDA device and compiled (not interpreted) kernels"
)


def labels(pattern: str, n: int, g: torch.Generator) -> torch.Tensor:
    """The shared label patterns, with 5 small classes in the imbalanced one."""
    return _labels(pattern, n, g, imbalanced_classes=5)


def make_inputs(n, m, d, pattern, case, dtype, seed=0, ref_pattern=None):
    """(x, y, r, z, excl) on DEVICE. ``case``: "square", "rect" (no exclusion) or "excl" (rectangular with a
    per-query excluded reference, -1 for some queries)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    y = labels(pattern, n, g)
    r = z = excl = None
    if case != "square":
        r = torch.randn(m, d, generator=g).to(dtype)
        z = labels(ref_pattern or pattern, m, g)
        if case == "excl":
            excl = torch.randint(0, m, (n,), generator=g)
            excl[torch.rand(n, generator=g) < 0.3] = -1
    mv = lambda t: None if t is None else t.to(DEVICE)
    return mv(x), mv(y), mv(r), mv(z), mv(excl)


def near_duplicates(n, d, dtype, scale=1e-4, seed=0):
    """Points in few tight clusters: many pairs at distance ~scale (the expansion's cancellation regime)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn((n + 3) // 4, d, generator=g)
    x = centers.repeat_interleave(4, 0)[:n] + scale * torch.randn(n, d, generator=g)
    x = x.to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def safe_quantile(values: torch.Tensor, f: float) -> float:
    """A threshold near the f-quantile of ``values`` that lies midway between two neighbouring values, so
    that fp32 rounding of a value cannot flip a comparison with it (a boundary case is not the point)."""
    v = torch.unique(values.detach().double().flatten().cpu())
    if v.numel() < 2:
        return float(v[0]) + 0.5 if v.numel() else 0.0
    k = min(max(int(f * (v.numel() - 1)), 0), v.numel() - 2)
    return float(v[k] + v[k + 1]) / 2


def as_ref(t, requires_grad=False):
    """The values a kernel saw, in float64 on the CPU (for the reference)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.double()
        if requires_grad:
            t.requires_grad_(True)
    return t


def ref_call(name, x, y, r, z, excl, *args, grad=False):
    """Call ``fastdml.reference.<name>`` on float64 CPU copies; returns (result, x64, r64)."""
    x64 = as_ref(x, grad)
    r64 = as_ref(r, grad)
    out = getattr(ref, name)(x64, as_ref(y), r64, as_ref(z), as_ref(excl), *args)
    return out, x64, r64


def assert_close_scaled(got, want, tol, what):
    """``got`` vs ``want`` with the dtype's (atol, rtol), the atol scaled by the largest |want|.

    Gradients and sums are sums of many terms of both signs: fp32 accumulation error is relative to the
    magnitude of the terms, not of each (possibly cancelled) result entry, hence the scale.
    """
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten NaN poison?)"
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")


def combine(parts, u):
    """sum_k u_k parts[k] (the op layer's backward) in float64."""
    return (parts.detach().cpu().double() * u.view(-1, 1, 1)).sum(0)


# (N, M, D, label pattern, case) of the row-extreme kernels (row_extreme, row_hardest): odd sizes, D = 1, 2,
# 3 (direct differences), 64 and 130, square, rectangular and per-query exclusion
ROW_SCENARIOS = [
    (45, 0, 1, "few", "square"),
    (70, 0, 130, "pk", "square"),
    (33, 0, 2, "one", "square"),
    (50, 37, 64, "imbalanced", "rect"),
    (41, 29, 3, "distinct", "excl"),
]


def grid(scenarios, fp16_scenarios=2):
    """(scenario, kind, dtype) cases: every scenario x kind in float32, and float16 on the first
    ``fp16_scenarios`` scenarios (fp16 only changes the load; keeping the interpreter run short)."""
    out = []
    for s in scenarios:
        for kind in ("l2", "sql2", "dot"):
            out.append(pytest.param(s, kind, torch.float32, id=f"{case_id(s)}-{kind}-fp32"))
    for s in scenarios[:fp16_scenarios]:
        for kind in ("l2", "dot"):
            out.append(pytest.param(s, kind, torch.float16, id=f"{case_id(s)}-{kind}-fp16"))
    return out


def case_id(s):
    return f"N{s[0]}M{s[1]}D{s[2]}-{s[3]}-{s[4]}"

"""fastdml.kernels.contrastive_stats_fwd against fastdml.reference.contrastive_stats: values and gradients.

The square case runs two ways (``deterministic``): the upper triangle with the transposed half added by
atomics, and the row-owned full square; both are checked against the reference, with the same exclusions,
near-duplicate recompute, NaN propagation and band/window semantics.
"""

import pytest
import torch
from fastdml.kernels import contrastive as kc
from fastdml.kernels import contrastive_stats_fwd

from fastdml import dispatch
from fastdml import reference as ref
from tests.kernel_cases import (
    DEVICE,
    INF,
    as_ref,
    assert_close_scaled,
    combine,
    cuda_only,
    make_inputs,
    near_duplicates,
    needs_kernels,
    ref_call,
    safe_quantile,
)

pytestmark = needs_kernels

# (N, M, D, label pattern, case): N, M never multiples of the 32-row blocks
SCENARIOS = [
    (45, 0, 1, "few", "square"),
    (70, 0, 3, "pk", "square"),
    (37, 0, 130, "imbalanced", "square"),
    (33, 0, 2, "one", "square"),
    (50, 37, 64, "few", "rect"),
    (41, 29, 2, "distinct", "excl"),
    (35, 66, 3, "pk", "excl"),
]


def _margins(x, r, kind, banded):
    """Margins/bands at quantiles of the actual d' so that every branch (hinge on and off) is exercised."""
    d = ref.signed_distance_matrix(as_ref(x), as_ref(r), kind).flatten()
    q = lambda f: safe_quantile(d, f)
    pos_margin, neg_margin = q(0.3), q(0.7)
    if banded:
        return pos_margin, neg_margin, q(0.2), q(0.8), -INF, q(0.9) - q(0.1)
    return pos_margin, neg_margin, -INF, INF, 0.0, INF


def _check(x, y, r, z, excl, kind, args, tol, dtype, deterministic=None):
    u = torch.randn(2, dtype=torch.float64)
    stats, gx, gr = contrastive_stats_fwd(x, y, r, z, excl, kind, *args, True, deterministic=deterministic)
    want, x64, r64 = ref_call("contrastive_stats", x, y, r, z, excl, kind, *args, grad=True)
    assert stats.dtype == torch.float64 and stats.shape == (4,)
    assert_close_scaled(stats, want.detach(), tol[dtype], "stats")
    loss = u[0] * want[0] + u[1] * want[2]
    leaves = [x64] if r is None else [x64, r64]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves)
    else:  # nothing counted: the reference sum has no graph, the gradient is zero
        grads = [torch.zeros_like(t) for t in leaves]
    n, d = x.shape
    assert gx.shape == (2, n, d) and gx.dtype == torch.float32
    assert_close_scaled(combine(gx, u), grads[0], tol[dtype], "gx")
    if r is None:
        assert gr.shape == (0, 0, d)
    else:
        assert gr.shape == (2, r.shape[0], d)
        assert_close_scaled(combine(gr, u), grads[1], tol[dtype], "gr")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["l2", "sql2", "dot"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: f"N{s[0]}M{s[1]}D{s[2]}-{s[3]}-{s[4]}")
def test_contrastive_stats_and_gradient_parts_match_reference(scenario, kind, dtype, tol):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n + d)
    banded = (n + d) % 2 == 1
    _check(x, y, r, z, excl, kind, _margins(x, r, kind, banded), tol, dtype)


@pytest.mark.parametrize("kind", ["l2", "sql2", "dot"])
def test_contrastive_without_grad_returns_empty_parts(kind, tol):
    x, y, r, z, excl = make_inputs(40, 35, 5, "few", "excl", torch.float32)
    args = _margins(x, r, kind, False)
    stats, gx, gr = contrastive_stats_fwd(x, y, r, z, excl, kind, *args, False)
    want, _, _ = ref_call("contrastive_stats", x, y, r, z, excl, kind, *args)
    assert_close_scaled(stats, want, tol[torch.float32], "stats")
    assert gx.shape == (0, 40, 5) and gr.shape == (0, 35, 5)
    stats, gx, gr = contrastive_stats_fwd(x, y, None, None, None, kind, *args, False)
    assert gx.shape == (0, 40, 5) and gr.shape == (0, 0, 5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d", [3, 130])
@pytest.mark.parametrize("only_near", [False, True])
@pytest.mark.parametrize("kind", ["l2", "sql2"])
def test_contrastive_near_duplicates_match_float64(kind, only_near, d, deterministic, tol):
    # pairs at distance ~1e-4: the expansion |x|^2 + |r|^2 - 2 x.r alone would be off by ~3e-4 in d, and the
    # GEMM form of the gradient (sum_j c_ij) x_i - sum_j c_ij x_j by ~1e-3 for c = 1/d. With only_near the
    # positive margin is out of reach, so only the near negative pairs carry weight (and dominate the check).
    # Rows shuffled: near pairs in different row blocks (the upper triangle's transposed contribution).
    x, y = near_duplicates(66, d, torch.float32)
    perm = torch.randperm(66, generator=torch.Generator().manual_seed(1)).to(x.device)
    x, y = x[perm], y[perm]
    pos_margin = 100.0 if only_near else (1e-3 if kind == "l2" else 1e-6)
    neg_margin = 5e-3 if kind == "l2" else 2.5e-5
    args = (pos_margin, neg_margin, -INF, INF, 0.0, INF)
    _check(x, y, None, None, None, kind, args, tol, torch.float32, deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_contrastive_identical_points_give_finite_zero_subgradient(deterministic, tol):
    x = torch.ones(34, 3)
    x[17:] = 2.0
    y = torch.arange(34) % 2
    x, y = x.to(DEVICE), y.to(DEVICE)
    _check(x, y, None, None, None, "l2", (-1.0, 2.0, -INF, INF, 0.0, INF), tol, torch.float32, deterministic)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_contrastive_atomic_mode_on_cuda(kind, tol):
    # real concurrency: the atomic mode's statistics are bitwise repeatable and its gradient equals the
    # deterministic mode's up to fp32 summation order; deterministic mode (also the default under torch's
    # deterministic flag) is bitwise repeatable
    x, y, _, _, _ = make_inputs(3000, 0, 64, "few", "square", torch.float32)
    args = (kind, 0.5, 12.0, -INF, INF, 0.0, INF)
    a = contrastive_stats_fwd(x, y, None, None, None, *args, True, deterministic=False)
    b = contrastive_stats_fwd(x, y, None, None, None, *args, True, deterministic=False)
    assert torch.equal(a[0], b[0])
    det = contrastive_stats_fwd(x, y, None, None, None, *args, True, deterministic=True)
    assert_close_scaled(a[0], det[0], tol[torch.float32], "stats")
    assert_close_scaled(a[1], det[1], tol[torch.float32], "gradient parts")
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        again = contrastive_stats_fwd(x, y, None, None, None, *args, True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(u, v) for u, v in zip(again, det))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_contrastive_bf16_on_cuda(kind, tol):
    x, y, r, z, excl = make_inputs(300, 0, 64, "pk", "square", torch.bfloat16)
    _check(x, y, r, z, excl, kind, _margins(x, r, kind, False), tol, torch.bfloat16)


# square cases of both modes: N off the 32-row blocks (1 to 5 row blocks, so one or several row-block pairs,
# an odd count with a middle block, ranges that straddle a pair's two blocks), D = 1, 127, 129 and 300 (one
# and several D groups), every label pattern
SQUARE = [
    (20, 1, "pk"),
    (45, 127, "one"),
    (97, 129, "distinct"),
    (150, 300, "imbalanced"),
    (131, 2, "pk"),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-triangle", "deterministic"])
@pytest.mark.parametrize("kind", ["l2", "sql2", "dot"])
@pytest.mark.parametrize("scenario", SQUARE, ids=lambda s: f"N{s[0]}D{s[1]}-{s[2]}")
def test_contrastive_square_modes_match_reference(scenario, kind, deterministic, tol):
    n, d, pattern = scenario
    x, y, _, _, _ = make_inputs(n, 0, d, pattern, "square", torch.float32, seed=n + d)
    args = _margins(x, None, kind, banded=n % 2 == 1)
    _check(x, y, None, None, None, kind, args, tol, torch.float32, deterministic)
    # the statistics-only sweep (the upper triangle in both modes)
    stats, gx, _ = contrastive_stats_fwd(x, y, None, None, None, kind, *args, False, deterministic=deterministic)
    want, _, _ = ref_call("contrastive_stats", x, y, None, None, None, kind, *args)
    assert gx.shape == (0, n, d)
    assert_close_scaled(stats, want, tol[torch.float32], "stats without gradient")


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_contrastive_runs_are_bitwise_repeatable(kind):
    # deterministic mode: everything; atomic mode: the statistics (per-program partials in a fixed order)
    x, y, _, _, _ = make_inputs(131, 0, 129, "pk", "square", torch.float32, seed=3)
    args = _margins(x, None, kind, banded=False)
    for det in (True, False):
        a = contrastive_stats_fwd(x, y, None, None, None, kind, *args, True, deterministic=det)
        b = contrastive_stats_fwd(x, y, None, None, None, kind, *args, True, deterministic=det)
        assert torch.equal(a[0], b[0]), f"deterministic={det}: statistics differ between runs"
        if det:
            assert torch.equal(a[1], b[1]), "deterministic mode: gradients differ between runs"


def test_contrastive_rectangular_ignores_the_mode():
    x, y, r, z, excl = make_inputs(41, 29, 130, "distinct", "excl", torch.float32)
    args = _margins(x, r, "l2", banded=True)
    a = contrastive_stats_fwd(x, y, r, z, excl, "l2", *args, True, deterministic=True)
    b = contrastive_stats_fwd(x, y, r, z, excl, "l2", *args, True, deterministic=False)
    for got, want in zip(a, b):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_contrastive_nan_rows_poison_both_modes_alike(kind):
    # a NaN row: its pairs fail every finite bound and pass the infinite ones, and its gradient reaches
    # every row through the GEMM (0 * NaN): the same NaN pattern in both modes
    x, y, _, _, _ = make_inputs(70, 0, 5, "pk", "square", torch.float32, seed=5)
    x[33] = float("nan")
    for args in ((0.1, 2.0, -INF, INF, 0.0, INF), (0.1, 2.0, 0.5, 1.5, 0.0, 1.0)):
        a = contrastive_stats_fwd(x, y, None, None, None, kind, *args, True, deterministic=True)
        b = contrastive_stats_fwd(x, y, None, None, None, kind, *args, True, deterministic=False)
        for got, want, what in zip(a[:2], b[:2], ("stats", "gradient")):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN patterns differ"
            ok = ~torch.isnan(want)
            torch.testing.assert_close(got[ok], want[ok], atol=1e-4, rtol=1e-4)


def test_contrastive_mode_follows_torch_deterministic_algorithms(monkeypatch):
    seen = []
    sweep = kc._sweep
    monkeypatch.setattr(kc, "_sweep", lambda *a: seen.append(a[-1]) or sweep(*a))
    x, y, r, z, excl = make_inputs(40, 35, 3, "few", "excl", torch.float32)
    args = (0.5, 1.5, -INF, INF, 0.0, INF)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            assert dispatch.kernel_atomics() is (not det)
            seen.clear()
            contrastive_stats_fwd(x, y, None, None, None, "l2", *args, True)
            contrastive_stats_fwd(x, y, None, None, None, "l2", *args, False)
            contrastive_stats_fwd(x, y, r, z, excl, "l2", *args, True)
            # square with gradient: the triangle unless deterministic; statistics only: always the triangle;
            # rectangular: never
            assert seen == [not det, True, False, False], seen
    finally:
        torch.use_deterministic_algorithms(prev)

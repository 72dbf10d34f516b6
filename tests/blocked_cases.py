"""Shared inputs and checks of the blocked-path tests (tests/test_blocked_*.py).

Every check compares :mod:`fastdml.blocked` with :mod:`fastdml.reference` evaluated in float64 on the
same input values (the blocked fp32/fp16 results must match the float64 result within TOL[dtype]).
Gradients: the blocked op returns the parts ``dS_k/dx``; for an upstream gradient ``g`` on the sums,
``sum_k g_k parts_k`` must equal the autograd gradient of ``sum_k g_k S_k`` through the reference.
``g`` is scaled like a reducer's (``1 / max(1, C_k)``), so gradients are O(1) as in a real loss.
"""

from __future__ import annotations

import math

import torch

from fastdml import blocked
from fastdml import reference as ref

from .conftest import TOL
from .label_patterns import PATTERNS, labels  # noqa: F401  (re-exported to the blocked tests)

INF = math.inf
KINDS = ("l2", "sql2", "dot")


def make_inputs(n, d, dtype, square=True, pattern="random", m=None, seed=0, scale=1.0):
    """(x, y, r, z, excl) with x in ``dtype``; rectangular: r (m, d), z, and excl with some -1."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = labels(pattern, n, g)
    if square:
        return x, y, None, None, None
    m = m if m is not None else n + 3
    r = (torch.randn(m, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    z = labels(pattern if pattern != "distinct" else "random", m, g)
    excl = torch.randint(-1, m, (n,), generator=g)
    return x, y, r, z, excl


def near_duplicates(n, d, dtype, scale=1e-3, seed=0, classes=4):
    """Pairs of points a tiny distance apart, each pair sharing its label (like two views of one image).

    Pairs share labels so that no positive and negative distance of an anchor differ by less than the fp32
    resolution (such exact ties would make any fp32 computation pick differently from float64).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n // 2, d, generator=g, dtype=torch.float64)
    yb = torch.randint(0, classes, (n // 2,), generator=g)
    x = torch.cat([base, base + scale * torch.randn(base.shape, generator=g, dtype=torch.float64)])
    y = torch.cat([yb, yb])
    p = torch.randperm(x.shape[0], generator=g)
    return x[p].to(dtype), y[p]


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


STATS = {
    # name: (blocked fn, reference fn, sum slots, count slots)
    "contrastive": (blocked.contrastive_stats_fwd, ref.contrastive_stats, (0, 2), (1, 3)),
    "triplet": (blocked.triplet_stats_fwd, ref.triplet_stats, (0,), (1,)),
    "semihard": (blocked.semihard_stats_fwd, ref.semihard_stats, (0,), (1,)),
}


def check_stats(name, x, y, r, z, excl, kind, args, seed=0, tol=None):
    """Blocked stats and gradient parts against the float64 reference (values and gradients)."""
    fb, fr, sums, counts = STATS[name]
    tol = tol or TOL[x.dtype]
    stats, gx, gr = fb(x, y, r, z, excl, kind, *args, True)
    assert stats.dtype == torch.float64
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert gx.dtype == acc and gx.shape == (len(sums),) + tuple(x.shape)
    if r is None:
        assert gr.shape == (0, 0, x.shape[1])
    else:
        assert gr.dtype == acc and gr.shape == (len(sums),) + tuple(r.shape)

    xr = f64(x).requires_grad_(True)
    rr = None if r is None else f64(r).requires_grad_(True)
    want = fr(xr, y, rr, z, excl, kind, *args)
    torch.testing.assert_close(stats, want.detach(), **tol, msg=lambda m: f"{name} stats: {m}")

    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(len(sums), generator=gen, dtype=torch.float64)
    g = g / want.detach()[list(counts)].clamp_min(1.0)
    gfull = torch.zeros(want.shape[0], dtype=torch.float64)
    gfull[list(sums)] = g
    if not want.requires_grad:  # nothing differentiable (e.g. no pair at all): the parts must be 0
        assert not gx.any() and not gr.any()
        return stats
    grads = torch.autograd.grad((want * gfull).sum(), [xr] + ([rr] if rr is not None else []), allow_unused=True)
    gx_want = grads[0] if grads[0] is not None else torch.zeros_like(xr)
    gx_got = torch.einsum("k,knd->nd", g, gx.to(torch.float64))
    torch.testing.assert_close(gx_got, gx_want, **tol, msg=lambda m: f"{name} dS/dx: {m}")
    if rr is not None:
        gr_want = grads[1] if grads[1] is not None else torch.zeros_like(rr)
        gr_got = torch.einsum("k,knd->nd", g, gr.to(torch.float64))
        torch.testing.assert_close(gr_got, gr_want, **tol, msg=lambda m: f"{name} dS/dr: {m}")
    return stats


# (pos_margin, neg_margin, pos_lo, neg_hi, low, high): AvgNonZero, Mean, a PairMarginMiner band with a
# Threshold window
CONTRASTIVE_CONFIGS = {
    "avgnonzero": (0.0, 1.0, -INF, INF, 0.0, INF),
    "mean": (0.2, 1.3, -INF, INF, -INF, INF),
    "band_threshold": (0.1, 1.5, 0.8, 2.2, 0.05, 0.9),
}
# (margin, smooth, band_lo, band_hi, low, high): no miner + AvgNonZero / Mean; TripletMarginMiner's
# semihard, hard and easy bands; a Threshold window; softplus
TRIPLET_CONFIGS = {
    "all_avgnonzero": (0.2, False, -INF, INF, 0.0, INF),
    "all_mean": (0.2, False, -INF, INF, -INF, INF),
    "semihard_band": (0.2, False, 0.0, 0.2, 0.0, INF),
    "hard_band": (0.2, False, -INF, 0.0, 0.0, INF),
    # two upper bounds at the same offset (t <= 0.2 and v > 0, i.e. b <= a + 0.2): both bind
    "two_uppers": (0.2, False, -INF, 0.2, 0.0, INF),
    "easy_band": (0.1, False, 0.1, INF, -INF, INF),
    "threshold_window": (0.3, False, -0.4, 0.5, 0.1, 0.35),
    "smooth": (0.2, True, -INF, INF, -INF, INF),
    "smooth_band_window": (0.3, True, -0.5, 0.4, 0.5, 1.0),
}

"""``need_grad_r``: stats ops whose references need no gradient (a detached memory queue or pool).

The ops decide from ``requires_grad``; the backends then return ``gr_parts`` of shape (0, M, D) and skip the
column side. Proved here: the values and the gradient of x are those of the reference, r gets no gradient,
each backend gives the same stats and gx parts with and without the flag, and the op compiles.
"""

from __future__ import annotations

import pytest
import torch

import fastdml
from fastdml import blocked, ops, reference
from fastdml.cross_batch_memory import CrossBatchMemory

from .conftest import TOL, triton_on_cpu
from .label_patterns import labels

INF = float("inf")

# (name, parameters after kind)
OPS = {
    "contrastive_stats": (0.1, 1.2, -INF, INF, 0.0, INF),
    "contrastive_band": (0.1, 1.2, 0.4, 1.6, 0.05, 0.9),
    "triplet_stats": (0.4, False, -INF, INF, 0.0, INF),
    "triplet_smooth": (0.4, True, -INF, 0.5, -INF, INF),
    "semihard_stats": (0.4,),
}


def _op_name(case: str) -> str:
    return {"contrastive_band": "contrastive_stats", "triplet_smooth": "triplet_stats"}.get(case, case)


def _inputs(dtype, pattern, n=37, m=53, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    r = (0.5 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    r[3] = x[2]  # an exact duplicate pair (d' = 0)
    y = labels(pattern, n, g)
    z = labels(pattern, m, g) if pattern != "distinct" else torch.randperm(m, generator=g)
    excl = torch.randint(-1, m, (n,), generator=g)
    return x, y, r, z, excl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pattern", ["one", "distinct", "imbalanced", "pk"])
@pytest.mark.parametrize("kind", ["l2", "sql2", "dot"])
@pytest.mark.parametrize("case", list(OPS))
def test_detached_references_give_reference_values_and_x_gradient(case, kind, pattern, dtype):
    x, y, r, z, excl = _inputs(dtype, pattern)
    params = OPS[case]
    name = _op_name(case)
    xa = x.clone().requires_grad_(True)
    got = getattr(ops, name)(xa, y, r, z, excl, kind, *params)
    up = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (got * up).sum().backward()

    xb = x.double().requires_grad_(True)
    with fastdml.use_backend("reference"):
        want = getattr(reference, name)(xb, y, r.double(), z, excl, kind, *params)
    (want * up).sum().backward()
    torch.testing.assert_close(got.detach(), want.detach(), **TOL[dtype])
    torch.testing.assert_close(xa.grad.double(), xb.grad, **TOL[dtype])
    assert not r.requires_grad and r.grad is None


def _backend_pair(fwd, x, y, r, z, excl, kind, params):
    a = fwd(x, y, r, z, excl, kind, *params, True, need_grad_r=True)
    b = fwd(x, y, r, z, excl, kind, *params, True, need_grad_r=False)
    return a, b


@pytest.mark.parametrize("kind", ["l2", "sql2", "dot"])
@pytest.mark.parametrize("case", list(OPS))
def test_blocked_without_need_grad_r_returns_empty_gr_and_the_same_stats_and_gx(case, kind):
    x, y, r, z, excl = _inputs(torch.float64, "imbalanced")
    fwd = getattr(blocked, _op_name(case) + "_fwd")
    (sa, gxa, gra), (sb, gxb, grb) = _backend_pair(fwd, x, y, r, z, excl, kind, OPS[case])
    assert gra.shape[1:] == (r.shape[0], r.shape[1]) and gra.shape[0] > 0
    assert grb.shape == (0, r.shape[0], r.shape[1])
    torch.testing.assert_close(sb, sa, **TOL[torch.float64])
    torch.testing.assert_close(gxb, gxa, **TOL[torch.float64])
    # the square case ignores the flag (its gradient is all in gx)
    (sq_a, gq_a, rq_a), (sq_b, gq_b, rq_b) = _backend_pair(fwd, x, y, None, None, None, kind, OPS[case])
    assert rq_a.shape == rq_b.shape == (0, 0, x.shape[1])
    torch.testing.assert_close(gq_b, gq_a, **TOL[torch.float64])


@triton_on_cpu
@pytest.mark.parametrize("kind", ["l2", "dot"])
@pytest.mark.parametrize("case", ["contrastive_stats", "triplet_stats", "semihard_stats"])
def test_kernels_without_need_grad_r_return_empty_gr_and_the_same_stats_and_gx(case, kind):
    from fastdml import kernels

    x, y, r, z, excl = _inputs(torch.float32, "pk", n=19, m=23, d=5)
    fwd = getattr(kernels, _op_name(case) + "_fwd")
    (sa, gxa, gra), (sb, gxb, grb) = _backend_pair(fwd, x, y, r, z, excl, kind, OPS[case])
    assert gra.shape == (gxa.shape[0], r.shape[0], r.shape[1])
    assert grb.shape == (0, r.shape[0], r.shape[1])
    torch.testing.assert_close(sb, sa, **TOL[torch.float32])
    torch.testing.assert_close(gxb, gxa, **TOL[torch.float32])
    # and the gx part is the reference's gradient of S
    xb = x.double().requires_grad_(True)
    with fastdml.use_backend("reference"):
        want = getattr(reference, _op_name(case))(xb, y, r.double(), z, excl, kind, *OPS[case])
    want[0].backward()
    torch.testing.assert_close(gxb[0].double(), xb.grad, **TOL[torch.float32])


def test_references_that_need_a_gradient_still_get_it():
    x, y, r, z, excl = _inputs(torch.float64, "pk")
    xa, ra = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    got = ops.triplet_stats(xa, y, ra, z, excl, "l2", 0.4)
    got[0].backward()
    xb, rb = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    want = reference.triplet_stats(xb, y, rb, z, excl, "l2", 0.4, False, -INF, INF, -INF, INF)
    want[0].backward()
    torch.testing.assert_close(ra.grad, rb.grad, **TOL[torch.float64])
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
    assert ra.grad.abs().max() > 0


def test_cross_batch_memory_asks_for_no_reference_gradient(monkeypatch):
    """The memory queue is detached: the stats op runs with need_grad_r=False and returns (0, M, D) parts."""
    seen = []
    inner = blocked.triplet_stats_fwd

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append((kwargs.get("need_grad_r"), tuple(out[2].shape)))
        return out

    monkeypatch.setattr(blocked, "triplet_stats_fwd", spy)
    cbm = CrossBatchMemory(fastdml.losses.TripletMarginLoss(margin=0.3), 4, memory_size=12)
    g = torch.Generator().manual_seed(0)
    for b in (5, 6, 4):
        x = torch.randn(b, 4, generator=g, dtype=torch.float64, requires_grad=True)
        cbm(x, torch.randint(0, 3, (b,), generator=g)).backward()
        assert x.grad.abs().max() > 0
    assert seen and all(flag is False and shape[0] == 0 for flag, shape in seen)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["contrastive_stats", "triplet_stats", "semihard_stats"])
def test_compiled_stats_op_with_detached_references_equals_eager(case):
    x, y, r, z, excl = _inputs(torch.float64, "pk")
    params = OPS[case]

    def f(x, r):
        s = getattr(ops, case)(x, y, r, z, excl, "l2", *params)
        return s[0] / s[1].clamp(min=1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = f(xa, r), compiled(xb, r)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, **TOL[torch.float64])
    torch.testing.assert_close(xb.grad, xa.grad, **TOL[torch.float64])
    assert xa.grad.abs().max() > 0

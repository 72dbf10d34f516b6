"""ops.pair_values (one implementation for every backend) against the reference: values and gradients."""

import pytest
import torch

from fastdml import config, ops, reference
from tests.conftest import TOL

KINDS = ["l2", "sql2", "dot"]


def _pairs(n, m, t, gen):
    return torch.randint(0, n, (t,), generator=gen), torch.randint(0, m, (t,), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("d", [1, 3, 130])
def test_pair_values_match_reference_values_and_gradients(dtype, kind, square, d):
    gen = torch.Generator().manual_seed(d)
    n, m, t = 37, 29, 101
    x = torch.randn(n, d, dtype=dtype, generator=gen, requires_grad=True)
    r = None if square else torch.randn(m, d, dtype=dtype, generator=gen, requires_grad=True)
    i, j = _pairs(n, n if square else m, t, gen)
    inputs = [x] if square else [x, r]

    got = ops.pair_values(x, r, i, j, kind)
    want = reference.pair_values(x, r, i, j, kind)
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[dtype])

    g = torch.randn(t, dtype=got.dtype, generator=gen)
    got_grads = torch.autograd.grad(got, inputs, g)
    want_grads = torch.autograd.grad(want, inputs, g.to(want.dtype))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_pair_values_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    i, j = _pairs(50, 50, 997, gen)
    whole = ops.pair_values(x, None, i, j, "l2")
    (gw,) = torch.autograd.grad(whole.sum(), x)
    with config.memory_budget(0.001):  # a few pairs per chunk
        chunked = ops.pair_values(x, None, i, j, "l2")
        (gc,) = torch.autograd.grad(chunked.sum(), x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(gc, gw, **TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_identical_points_have_finite_zero_distance_gradients(kind):
    x = torch.ones(4, 3, requires_grad=True)
    v = ops.pair_values(x, None, torch.tensor([0, 1]), torch.tensor([1, 2]), kind)
    (g,) = torch.autograd.grad(v.sum(), x)
    assert torch.isfinite(g).all()
    if kind != "dot":
        assert torch.equal(v, torch.zeros(2))
        assert torch.equal(g, torch.zeros_like(x))


def test_pair_values_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    i, j = _pairs(6, 5, 9, gen)
    for kind in KINDS:
        assert torch.autograd.gradcheck(lambda a, b, kind=kind: ops.pair_values(a, b, i, j, kind), (x, r))


def test_pair_values_compiles_fullgraph():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, generator=gen, requires_grad=True)
    i, j = _pairs(9, 9, 12, gen)
    fn = lambda a: ops.pair_values(a, None, i, j, "l2").sum()
    eager = fn(x)
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(fn, fullgraph=True)(x)
    (gc,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    torch.testing.assert_close(gc, ge, **TOL[torch.float32])

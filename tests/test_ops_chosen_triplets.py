"""ops.chosen_triplet_stats (one given triplet per anchor, gradient in the forward) against the reference.

The reference evaluates the same sum and count through plain autograd on pair distances; the op must give
the same [S, C] and the same gradients for a random upstream gradient, for every kind, window, softplus,
square and rectangular references, odd D (1, 2, 3, 130), invalid anchors, chunking under a tiny budget and
zero distances (identical points). Every test runs with the compiled loop of fastdml/blocked/native.py and
with the torch ops it replaces (the ``native_path`` fixture).
"""

import math

import pytest
import torch

from fastdml import config, ops, reference
from tests.conftest import TOL

pytestmark = pytest.mark.usefixtures("native_path")

INF = math.inf
KINDS = ["l2", "sql2", "dot"]
WINDOWS = [(-INF, INF), (0.0, INF), (0.01, 0.7)]


def _inputs(n, m, d, dtype, square, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(n, d, dtype=torch.float64, generator=gen)).to(dtype).requires_grad_()
    r = None if square else (0.5 * torch.randn(m, d, dtype=torch.float64, generator=gen)).to(dtype).requires_grad_()
    cols = n if square else m
    p = torch.randint(0, cols, (n,), generator=gen)
    neg = torch.randint(0, cols, (n,), generator=gen)
    valid = torch.rand(n, generator=gen) > 0.2
    return x, r, p, neg, valid, gen


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", [1, 2, 3, 130])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("smooth", [False, True], ids=["hinge", "softplus"])
@pytest.mark.parametrize("window", WINDOWS, ids=["all", "nonzero", "band"])
def test_chosen_triplet_stats_match_reference_values_and_gradients(window, smooth, square, kind, d, dtype):
    x, r, p, n, valid, gen = _inputs(41, 29, d, dtype, square, seed=d)
    margin = 0.3
    got = ops.chosen_triplet_stats(x, valid, r, p, n, kind, margin, smooth, *window)
    # the reference in float64 on the very values the op saw
    x64, r64 = _f64(x), _f64(r)
    want = reference.chosen_triplet_stats(x64, valid, r64, p, n, kind, margin, smooth, *window)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got[1].item() == want[1].item(), "counts differ"
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], want[0], **tol)

    g = torch.randn((), dtype=torch.float64, generator=gen)
    inputs = [x] if square else [x, r]
    got_grads = torch.autograd.grad(got[0], inputs, g)
    want_grads = torch.autograd.grad(want[0], [x64] if square else [x64, r64], g)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_chosen_triplet_stats_chunked_equals_one_chunk(kind):
    x, r, p, n, valid, _ = _inputs(53, 0, 7, torch.float64, True, seed=5)
    whole = ops.chosen_triplet_stats(x, valid, None, p, n, kind, 0.2)
    (gw,) = torch.autograd.grad(whole[0], x)
    with config.memory_budget(0.0005):  # a few anchors per chunk
        chunked = ops.chosen_triplet_stats(x, valid, None, p, n, kind, 0.2)
        (gc,) = torch.autograd.grad(chunked[0], x)
    torch.testing.assert_close(chunked, whole, **TOL[torch.float64])
    torch.testing.assert_close(gc, gw, **TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_chosen_triplets_of_identical_points_have_finite_gradients(kind):
    # every distance is 0: the L2 subgradient at 0 is 0, never 0/0
    x = torch.ones(6, 3, requires_grad=True)
    idx = torch.tensor([1, 2, 3, 4, 5, 0])
    st = ops.chosen_triplet_stats(x, torch.ones(6, dtype=torch.bool), None, idx, idx.flip(0), kind, 0.5)
    (g,) = torch.autograd.grad(st[0], x)
    assert torch.isfinite(st).all() and torch.isfinite(g).all()
    if kind != "dot":
        assert st[0].item() == pytest.approx(6 * 0.5) and st[1].item() == 6
        assert torch.equal(g, torch.zeros_like(x))


def test_chosen_triplets_without_valid_anchor_give_zero_with_zero_gradient():
    x, r, p, n, _, _ = _inputs(9, 0, 4, torch.float32, True, seed=2)
    st = ops.chosen_triplet_stats(x, torch.zeros(9, dtype=torch.bool), None, p, n, "l2", 1.0)
    assert st.tolist() == [0.0, 0.0]
    assert st.requires_grad
    (g,) = torch.autograd.grad(st[0], x)
    assert torch.equal(g, torch.zeros_like(x))


def test_chosen_triplets_against_a_detached_reference_give_only_the_query_gradient():
    x, r, p, n, valid, _ = _inputs(17, 13, 5, torch.float64, False, seed=3)
    rd = r.detach()
    st = ops.chosen_triplet_stats(x, valid, rd, p, n, "l2", 0.4)
    (gx,) = torch.autograd.grad(st[0], x)
    want = reference.chosen_triplet_stats(_f64(x), valid, rd, p, n, "l2", 0.4, False, -INF, INF)
    torch.testing.assert_close(st, want.detach(), **TOL[torch.float64])
    x64 = _f64(x)
    want = reference.chosen_triplet_stats(x64, valid, rd, p, n, "l2", 0.4, False, -INF, INF)
    (wx,) = torch.autograd.grad(want[0], x64)
    torch.testing.assert_close(gx, wx, **TOL[torch.float64])


def test_chosen_triplet_stats_under_no_grad_build_no_graph():
    x, r, p, n, valid, _ = _inputs(8, 0, 3, torch.float64, True, seed=4)
    with torch.no_grad():
        st = ops.chosen_triplet_stats(x, valid, None, p, n, "l2", 0.1)
    assert not st.requires_grad


def test_chosen_triplets_against_an_empty_reference_give_zero_with_zero_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    r = torch.zeros(0, 3)
    idx = torch.zeros(5, dtype=torch.int64)  # what the miners return where nothing was found
    st = ops.chosen_triplet_stats(x, torch.zeros(5, dtype=torch.bool), r, idx, idx, "l2", 0.1)
    assert st.tolist() == [0.0, 0.0]
    (g,) = torch.autograd.grad(st[0], x)
    assert torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("call", ["batch_hard_loss", "miner_and_loss"])
def test_batch_hard_against_an_empty_reference_set_is_a_zero_loss_with_zero_gradient(call):
    from fastdml import losses, miners

    x = torch.randn(8, 4, requires_grad=True)
    y = torch.arange(8) % 3
    ref, ref_y = torch.zeros(0, 4), y[:0]
    if call == "batch_hard_loss":
        val = losses.BatchHardTripletLoss()(x, y, None, ref, ref_y)
    else:
        val = losses.TripletMarginLoss()(x, y, miners.BatchHardMiner()(x, y, ref, ref_y), ref, ref_y)
    (g,) = torch.autograd.grad(val, x)
    assert val.item() == 0.0 and torch.equal(g, torch.zeros_like(x))

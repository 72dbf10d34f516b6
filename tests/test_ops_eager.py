"""Eager calls of the ops run the custom op's implementation, setup and backward without the dispatcher
(``fastdml.ops._Op``); they must give exactly what the registered custom op gives: the same values and the
same gradients for a random upstream gradient, for every op (the listing ops too), square and rectangular,
with and without a gradient for the references.
"""

import math

import pytest
import torch

from fastdml import ops

INF = math.inf


def _inputs(square, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 6, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 4, (37,), generator=g)
    if square:
        return x, y, None, None, g
    r = torch.randn(29, 6, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randint(0, 4, (29,), generator=g)
    return x, y, r, z, g


def _stats_calls(x, y, r, z, g):
    cols = x.shape[0] if r is None else r.shape[0]
    p = torch.randint(0, cols, (x.shape[0],), generator=g)
    n = torch.randint(0, cols, (x.shape[0],), generator=g)
    valid = torch.rand(x.shape[0], generator=g) > 0.2
    return {
        "contrastive_stats": (x, y, r, z, None, "l2", 0.1, 1.2, -INF, INF, 0.0, INF),
        "triplet_stats": (x, y, r, z, None, "sql2", 0.3, False, -INF, 0.5, 0.0, INF),
        "semihard_stats": (x, y, r, z, None, "l2", 0.2),
        "chosen_triplet_stats": (x, valid, r, p, n, "l2", 0.4, False, 0.0, INF),
    }


@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("grad_r", [True, False])
@pytest.mark.parametrize("name", ["contrastive_stats", "triplet_stats", "semihard_stats", "chosen_triplet_stats"])
def test_eager_stats_op_equals_the_custom_op(name, square, grad_r):
    x, y, r, z, g = _inputs(square, seed=3)
    x.requires_grad_(True)
    if r is not None and grad_r:
        r.requires_grad_(True)
    args = _stats_calls(x, y, r, z, g)[name]
    need_grad_r = r is not None and r.requires_grad
    eager, _, _ = ops._OPS[name](*args, True, need_grad_r)
    custom, _, _ = getattr(torch.ops.fastdml, name)(*args, True, need_grad_r)
    assert torch.equal(eager, custom)
    upstream = torch.randn(eager.shape, generator=g, dtype=eager.dtype)
    wrt = [t for t in (x, r) if t is not None and t.requires_grad]
    ge = torch.autograd.grad(eager, wrt, upstream)
    gc = torch.autograd.grad(custom, wrt, upstream)
    for a, b in zip(ge, gc):
        assert torch.equal(a, b)
    assert any(bool((a != 0).any()) for a in ge)  # the comparison covers a non-trivial gradient


@pytest.mark.parametrize("square", [True, False])
def test_eager_row_ops_equal_the_custom_ops(square):
    x, y, r, z, g = _inputs(square, seed=5)
    got = ops.row_hardest(x, y, r, z, None, "l2")
    want = torch.ops.fastdml.row_hardest(x, y, r, z, None, "l2")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got = ops.row_extreme(x, y, r, z, None, "l2", "neg", "min", -INF, 2.0)
    want = torch.ops.fastdml.row_extreme(x, y, r, z, None, "l2", "neg", "min", -INF, 2.0, None, "")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("square", [True, False])
def test_eager_pair_values_equal_the_custom_op(square):
    x, _, r, _, g = _inputs(square, seed=7, dtype=torch.float64)
    x.requires_grad_(True)
    if r is not None:
        r.requires_grad_(True)
    cols = x.shape[0] if r is None else r.shape[0]
    i = torch.randint(0, x.shape[0], (50,), generator=g)
    j = torch.randint(0, cols, (50,), generator=g)
    i[0], j[0] = 0, 0  # (square: one zero distance, whose gradient is the subgradient 0)
    eager = ops.pair_values(x, r, i, j, "l2")
    custom = torch.ops.fastdml.pair_values(x, r, i, j, "l2")
    assert torch.equal(eager, custom)
    upstream = torch.randn(eager.shape, generator=g, dtype=eager.dtype)
    wrt = [t for t in (x, r) if t is not None]
    for a, b in zip(torch.autograd.grad(eager, wrt, upstream), torch.autograd.grad(custom, wrt, upstream)):
        assert torch.equal(a, b)


def test_eager_call_runs_without_the_dispatcher(monkeypatch):
    # the custom op must not be reached eagerly (that path is what the eager call saves)
    x, y, _, _, _ = _inputs(True, seed=9)

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called eagerly")

    monkeypatch.setattr(torch.ops.fastdml, "row_hardest", refuse, raising=False)
    out = ops.row_hardest(x, y, None, None, None, "l2")
    assert len(out) == 6


@pytest.mark.parametrize("square", [True, False])
def test_eager_listing_ops_equal_the_custom_ops(square):
    x, y, r, z, _ = _inputs(square, seed=11)
    got = ops.triplet_list(x, y, r, z, None, "l2", -INF, 0.4)
    want = torch.ops.fastdml.triplet_list(x, y, r, z, None, "l2", -INF, 0.4)
    assert len(got[0]) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))
    got = ops.pair_list(x, y, r, z, None, "l2", 0.5, 3.0)
    want = torch.ops.fastdml.pair_list(x, y, r, z, None, "l2", 0.5, 3.0)
    assert len(got[0]) > 0 and len(got[2]) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))

"""torch.compile(fullgraph=True) traces every fused loss with no graph break (CPU: the blocked custom ops),
and the compiled loss and gradient equal the eager ones.

Each loss goes through the ``fastdml::*`` custom ops (fake implementations give every output's shape, no
Python branch on data-dependent sizes), so Dynamo sees one graph; a break raises under fullgraph=True.
"""

import pytest
import torch

from fastdml import distances, functional, losses, miners, reducers
from tests.conftest import TOL


def _batch(n=24, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % classes
    return x, y


LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(),
    "contrastive_unnormalized_sql2": lambda: losses.ContrastiveLoss(
        pos_margin=0.1, neg_margin=2.0, distance=distances.LpDistance(normalize_embeddings=False, power=2)
    ),
    "contrastive_cosine": lambda: losses.ContrastiveLoss(
        pos_margin=0.9, neg_margin=0.3, distance=distances.CosineSimilarity()
    ),
    "triplet_margin_all": lambda: losses.TripletMarginLoss(margin=0.2),
    "triplet_margin_smooth": lambda: losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
    "batch_all": lambda: losses.BatchAllTripletLoss(),
    "batch_hard": lambda: losses.BatchHardTripletLoss(),
    "batch_hard_soft": lambda: losses.BatchHardTripletLoss(soft=True),
    "semihard": lambda: losses.SemiHardTripletLoss(),
}


def _check_compiled_equals_eager(fn, x, y):
    xe = x.clone().requires_grad_(True)
    eager = fn(xe, y)
    (ge,) = torch.autograd.grad(eager, xe)
    xc = x.clone().requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(xc, y)
    (gc,) = torch.autograd.grad(compiled, xc)
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    torch.testing.assert_close(gc, ge, **TOL[torch.float32])
    assert eager.item() != 0.0  # the case exercises a non-trivial loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_fused_loss_compiles_fullgraph_and_matches_eager(name):
    loss_fn = LOSSES[name]()
    x, y = _batch()
    _check_compiled_equals_eager(lambda a, b: loss_fn(a, b), x, y)


def test_paired_contrastive_loss_compiles_fullgraph():
    loss_fn = losses.PairedContrastiveLoss()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    la, lb = torch.randint(0, 2, (16,), generator=g), torch.randint(0, 2, (16,), generator=g)
    fn = lambda u, v: loss_fn(u, b, v, lb)
    _check_compiled_equals_eager(fn, a, la)


def test_triplet_loss_with_fused_batch_hard_miner_compiles_fullgraph():
    loss_fn, miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
    x, y = _batch(seed=2)
    _check_compiled_equals_eager(lambda a, b: loss_fn(a, b, miner(a, b)), x, y)


@pytest.mark.parametrize(
    "fn_name", ["contrastive_loss", "triplet_margin_loss", "batch_hard_triplet_loss", "semihard_triplet_loss"]
)
def test_functional_losses_compile_fullgraph(fn_name):
    fn = getattr(functional, fn_name)
    x, y = _batch(seed=3)
    _check_compiled_equals_eager(lambda a, b: fn(a, b), x, y)


GIVEN = {
    "triplet_avg_nonzero": (lambda: losses.TripletMarginLoss(margin=0.3), 3),
    "triplet_mean": (lambda: losses.TripletMarginLoss(margin=0.3, reducer=reducers.MeanReducer()), 3),
    "triplet_threshold": (
        lambda: losses.TripletMarginLoss(margin=0.3, reducer=reducers.ThresholdReducer(low=0.05, high=0.6)),
        3,
    ),
    "contrastive": (lambda: losses.ContrastiveLoss(), 4),
    "contrastive_cosine": (lambda: losses.ContrastiveLoss(distance=distances.CosineSimilarity()), 4),
}


def _given_tuple(arity, n, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, n, (count,), generator=g) for _ in range(arity))


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_loss_on_an_explicit_indices_tuple_compiles_fullgraph_and_matches_eager(name):
    make, arity = GIVEN[name]
    loss_fn = make()
    x, y = _batch()
    idx = _given_tuple(arity, x.shape[0], 57)
    _check_compiled_equals_eager(lambda a, b: loss_fn(a, b, idx), x, y)


def test_compiled_loss_on_an_explicit_tuple_with_nothing_counted_is_zero_with_zero_gradient():
    # every triplet inactive (its positive is its negative): AvgNonZero counts nothing
    loss_fn = losses.TripletMarginLoss(margin=0.0)
    x, y = _batch()
    a = torch.arange(10)
    idx = (a, a + 1, a + 1)
    xc = x.clone().requires_grad_(True)
    torch._dynamo.reset()
    val = torch.compile(lambda t: loss_fn(t, y, idx), fullgraph=True)(xc)
    (g,) = torch.autograd.grad(val, xc)
    assert val.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_compiled_loss_refuses_an_out_of_range_explicit_index():
    loss_fn = losses.TripletMarginLoss()
    x, y = _batch()
    idx = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, x.shape[0]]))
    torch._dynamo.reset()
    f = torch.compile(lambda t: loss_fn(t, y, idx), fullgraph=True)
    with pytest.raises(RuntimeError, match=r"indices_tuple\[2\] has indices outside"):
        f(x)

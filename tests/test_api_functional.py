"""Functional forms equal their modules; the paired contrastive loss equals its formula (Hadsell et al.)."""

import pytest
import torch

import fastdml
from fastdml import distances as D
from fastdml import functional as FN
from fastdml import losses as L
from fastdml import miners as M
from fastdml import reducers as R
from tests import api_cases as _cases
from tests.api_cases import (
    assert_close_to_pml,
    batch,
    loss_and_grads,
    pml_miners,
    same_indices,
)

backend = _cases.backend  # the fixture: every available backend

DIST_OBJ = {
    "euclidean": lambda n: D.LpDistance(normalize_embeddings=n),
    "squared": lambda n: D.LpDistance(normalize_embeddings=n, power=2),
    "cosine": lambda n: D.CosineSimilarity(),
    "dot": lambda n: D.DotProductSimilarity(normalize_embeddings=n),
}
RED_OBJ = {"nonzero": R.AvgNonZeroReducer, "mean": R.MeanReducer, "sum": R.SumReducer}


@pytest.mark.parametrize("dist", list(DIST_OBJ))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", list(RED_OBJ))
def test_functional_contrastive_and_triplet_equal_modules(backend, dist, normalize, reduction):
    x, y = batch(n=14, d=3, classes=3, seed=0)
    d, r = DIST_OBJ[dist], RED_OBJ[reduction]
    sim = dist in ("cosine", "dot")
    margins = dict(pos_margin=0.8, neg_margin=0.2) if sim else dict(pos_margin=0.1, neg_margin=1.2)
    a = loss_and_grads(
        lambda e: FN.contrastive_loss(e, y, distance=dist, normalize=normalize, reduction=reduction, **margins), x
    )
    b = loss_and_grads(lambda e: L.ContrastiveLoss(distance=d(normalize), reducer=r(), **margins)(e, y), x)
    assert_close_to_pml(a, b, torch.float64)
    a = loss_and_grads(
        lambda e: FN.triplet_margin_loss(e, y, margin=0.3, distance=dist, normalize=normalize, reduction=reduction), x
    )
    b = loss_and_grads(lambda e: L.TripletMarginLoss(margin=0.3, distance=d(normalize), reducer=r())(e, y), x)
    assert_close_to_pml(a, b, torch.float64)


def test_functional_one_pass_losses_equal_modules(backend):
    x, y = batch(n=16, d=3, classes=4, seed=1, pattern="pk")
    pairs = [
        (lambda e: FN.batch_hard_triplet_loss(e, y, margin=0.5), lambda e: L.BatchHardTripletLoss(margin=0.5)(e, y)),
        (lambda e: FN.batch_hard_triplet_loss(e, y, soft=True), lambda e: L.BatchHardTripletLoss(soft=True)(e, y)),
        (lambda e: FN.batch_all_triplet_loss(e, y), lambda e: L.BatchAllTripletLoss()(e, y)),
        (
            lambda e: FN.batch_all_triplet_loss(e, y, reduction="mean"),
            lambda e: L.BatchAllTripletLoss(average="all")(e, y),
        ),
        (lambda e: FN.semihard_triplet_loss(e, y, margin=0.4), lambda e: L.SemiHardTripletLoss(margin=0.4)(e, y)),
        (
            lambda e: FN.semihard_triplet_loss(e, y, distance="cosine"),
            lambda e: L.SemiHardTripletLoss(distance=D.CosineSimilarity())(e, y),
        ),
    ]
    for f, g in pairs:
        assert_close_to_pml(loss_and_grads(f, x), loss_and_grads(g, x), torch.float64)


def test_functional_reduction_none_returns_terms(backend):
    x, y = batch(n=10, d=3, classes=2, seed=2)
    pos, neg = FN.contrastive_loss(x, y, reduction="none")
    d = L.ContrastiveLoss(reducer=R.DoNothingReducer())(x, y)
    torch.testing.assert_close(pos, d["pos_loss"]["losses"])
    torch.testing.assert_close(neg, d["neg_loss"]["losses"])
    t = FN.triplet_margin_loss(x, y, reduction="none")
    assert t.ndim == 1 and t.numel() == len(pml_miners.TripletMarginMiner(margin=1e9)(x, y)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dist", ["euclidean", "squared"])
@pytest.mark.parametrize("w", [0.5, 0.8])
def test_paired_contrastive_equals_the_write_up(backend, dist, w, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    yy = torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.5
    xl = torch.randint(0, 2, (12,), generator=g)
    yl = torch.randint(0, 2, (12,), generator=g)

    def write_up(a, b):  # the post's ContrastiveLoss.forward with distance = nn.PairwiseDistance-like
        equal = xl == yl  # (bool * float would round the weight to float32: multiply as float64)
        eq, ne = equal.to(torch.float64), (~equal).to(torch.float64)
        dd = torch.sqrt(((a - b) ** 2).sum(1))
        if dist == "squared":
            dd = dd**2
        positive_loss = eq * w * dd.square()
        negative_loss = ne * (1 - w) * (1.5 - dd).clamp(0).square()
        return (positive_loss + negative_loss).sum()

    got = loss_and_grads(
        lambda a, b: FN.paired_contrastive_loss(a, b, xl, yl, margin=1.5, positive_weight=w, distance=dist),
        x.to(dtype),
        yy.to(dtype),
    )
    mod = L.PairedContrastiveLoss(
        distance=D.LpDistance(normalize_embeddings=False, power=2 if dist == "squared" else 1),
        margin=1.5,
        positive_weight=w,
    )
    got_mod = loss_and_grads(lambda a, b: mod(a, b, xl, yl), x.to(dtype), yy.to(dtype))
    want = loss_and_grads(write_up, x, yy)
    assert_close_to_pml(got, want, dtype)
    assert_close_to_pml(got_mod, want, dtype)


def test_paired_contrastive_generic_distance_and_identical_pairs():
    x = torch.randn(6, 3, dtype=torch.float64)
    lab = torch.tensor([0, 1, 0, 1, 0, 1])
    # identical pairs with equal labels: zero loss, finite zero gradient
    loss, (gx, gy) = loss_and_grads(lambda a, b: L.PairedContrastiveLoss()(a, b, lab, lab), x, x)
    assert float(loss) == 0.0 and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    # L1 (generic path through pairwise_distance)
    l1 = L.PairedContrastiveLoss(distance=D.LpDistance(p=1, normalize_embeddings=False), margin=2.0)
    y = x.flip(0)
    want = torch.where(
        lab == lab.flip(0), 0.5 * (x - y).abs().sum(1) ** 2, 0.5 * torch.relu(2.0 - (x - y).abs().sum(1)) ** 2
    ).sum()
    torch.testing.assert_close(l1(x, y, lab, lab.flip(0)), want)


@pytest.mark.parametrize("pos,neg", [("hard", "hard"), ("easy", "semihard"), ("semihard", "easy"), ("easy", "hard")])
@pytest.mark.parametrize("dist", ["euclidean", "cosine"])
def test_easy_hard_pairs_equal_miner_selection(backend, pos, neg, dist):
    x, y = batch(n=16, d=3, classes=3, seed=4)
    sel = FN.easy_hard_pairs(x, y, pos, neg, distance=dist)
    d = DIST_OBJ[dist](True)
    a, p, a2, n = M.BatchEasyHardMiner(pos_strategy=pos, neg_strategy=neg, distance=d)(x, y)
    assert same_indices((sel.anchor, sel.positive, sel.negative), (a, p, n))
    mat = d(x)
    torch.testing.assert_close(sel.pos_dist, mat[a, p])
    torch.testing.assert_close(sel.neg_dist, mat[a, n])
    hp = FN.hardest_pairs(x, y)
    bh = pml_miners.BatchHardMiner()(x, y)
    assert same_indices((hp.anchor, hp.positive, hp.negative), bh)


def test_make_distance_and_reducer_pass_objects_through():
    d = fastdml.distances.LpDistance(p=1)
    assert FN.make_distance(d) is d
    r = R.SumReducer()
    assert FN.make_reducer(r) is r

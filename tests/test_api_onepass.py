"""The one-pass batch losses: BatchHardTripletLoss, BatchAllTripletLoss, SemiHardTripletLoss.

Checked against a direct port of TF-Addons' formulas written here from the math (pairwise_distance,
masked_maximum / masked_minimum, the semi-hard tiling), on batches where every anchor has a positive and a
negative (where TF-Addons' masked-max quirks do not apply), and against the PML miner + loss combinations
they are equal to.
"""

import pytest
import torch
import torch.nn.functional as F

from fastdml import distances as D
from fastdml import losses as L
from fastdml import miners as M
from fastdml import reducers as R
from tests import api_cases as _cases
from tests.api_cases import (
    assert_close_to_pml,
    batch,
    loss_and_grads,
    pml_distances,
    pml_losses,
    pml_miners,
    pml_reducers,
)

backend = _cases.backend  # the fixture: every available backend

DTYPES = [torch.float64, torch.float32]


# ---- TF-Addons' formulas (tensorflow_addons/losses/triplet.py, metric_learning.py), in torch ----
def tfa_pairwise_distance(e, squared=False):
    sq = (e * e).sum(1)
    pds = sq[:, None] + sq[None, :] - 2.0 * e @ e.T
    pds = pds.clamp_min(0.0)
    error_mask = pds <= 0.0
    if not squared:
        pds = torch.sqrt(pds + error_mask.to(pds.dtype) * 1e-16)
    pds = pds * (~error_mask).to(pds.dtype)
    off = 1.0 - torch.eye(e.shape[0], dtype=pds.dtype)
    return pds * off


def masked_maximum(data, mask):
    axis_min = data.min(1, keepdim=True).values
    return ((data - axis_min) * mask).max(1, keepdim=True).values + axis_min


def masked_minimum(data, mask):
    axis_max = data.max(1, keepdim=True).values
    return ((data - axis_max) * mask).min(1, keepdim=True).values + axis_max


def tfa_triplet_hard_loss(labels, emb, margin=1.0, soft=False):
    pdist = tfa_pairwise_distance(emb)
    adjacency = labels[:, None] == labels[None, :]
    mask_positives = adjacency.to(pdist.dtype) - torch.eye(len(labels), dtype=pdist.dtype)
    hardest_pos = masked_maximum(pdist, mask_positives)
    hardest_neg = masked_minimum(pdist, (~adjacency).to(pdist.dtype))
    if soft:
        loss = torch.log1p(torch.exp(hardest_pos - hardest_neg))
    else:
        loss = torch.clamp_min(hardest_pos - hardest_neg + margin, 0.0)
    return loss.mean()


def tfa_triplet_semihard_loss(labels, emb, margin=1.0):
    pdist = tfa_pairwise_distance(emb)
    n = len(labels)
    adjacency = labels[:, None] == labels[None, :]
    adjacency_not = ~adjacency
    pdist_tile = pdist.repeat(n, 1)
    mask = adjacency_not.repeat(n, 1) & (pdist_tile > pdist.T.reshape(-1, 1))
    mask_final = mask.any(1, keepdim=True).reshape(n, n).T
    negatives_outside = masked_minimum(pdist_tile, mask.to(pdist.dtype)).reshape(n, n).T
    negatives_inside = masked_maximum(pdist, adjacency_not.to(pdist.dtype)).repeat(1, n)
    semi_hard = torch.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi_hard
    mask_positives = adjacency.to(pdist.dtype) - torch.eye(n, dtype=pdist.dtype)
    return torch.clamp_min(loss_mat * mask_positives, 0.0).sum() / mask_positives.sum()


def _tf(fn, x):
    return loss_and_grads(fn, x.to(torch.float64))


# ---- against TF-Addons ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(margin=0.3), dict(soft=True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_matches_tf_addons(backend, opts, seed, dtype):
    x, y = batch(n=24, d=4, classes=4, dtype=dtype, seed=seed, pattern="pk", scale=0.7)
    got = loss_and_grads(lambda e: L.BatchHardTripletLoss(**opts)(e, y), x)
    want = _tf(lambda e: tfa_triplet_hard_loss(y, e, **opts), x)
    assert_close_to_pml(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [1.0, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_semihard_matches_tf_addons(backend, margin, seed, dtype):
    x, y = batch(n=24, d=3, classes=4, dtype=dtype, seed=seed, pattern="pk")
    got = loss_and_grads(lambda e: L.SemiHardTripletLoss(margin=margin)(e, y), x)
    want = _tf(lambda e: tfa_triplet_semihard_loss(y, e, margin=margin), x)
    assert_close_to_pml(got, want, dtype)


def test_semihard_per_element_reducer_path_matches_fused(backend):
    # a reducer without a fused window takes the materialized selection; with MeanReducer-equivalent math
    # (a custom subclass) the numbers must be the same
    class MyMean(R.MeanReducer):
        pass

    x, y = batch(n=20, d=3, classes=3, seed=2, pattern="pk")
    fused = loss_and_grads(lambda e: L.SemiHardTripletLoss(margin=0.5)(e, y), x)
    per_elem = loss_and_grads(lambda e: L.SemiHardTripletLoss(margin=0.5, reducer=MyMean())(e, y), x)
    assert_close_to_pml(per_elem, fused, torch.float64)


# ---- against PML miner + loss and against each other ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["plain", "cosine"])
def test_batch_hard_equals_pml_batch_hard_miner_plus_triplet_loss(backend, dist, dtype):
    x, y = batch(n=20, d=4, classes=3, dtype=dtype, seed=3)
    if dist == "plain":
        ours_d, pml_d = D.LpDistance(normalize_embeddings=False), pml_distances.LpDistance(normalize_embeddings=False)
    else:
        ours_d, pml_d = D.CosineSimilarity(), pml_distances.CosineSimilarity()
    got = loss_and_grads(lambda e: L.BatchHardTripletLoss(margin=0.3, distance=ours_d)(e, y), x)

    def pml(e):
        idx = pml_miners.BatchHardMiner(distance=pml_d)(e, y)
        return pml_losses.TripletMarginLoss(margin=0.3, distance=pml_d, reducer=pml_reducers.MeanReducer())(e, y, idx)

    assert_close_to_pml(got, loss_and_grads(pml, x.to(torch.float64)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average", ["nonzero", "all"])
def test_batch_all_equals_pml_triplet_margin_loss(backend, average, dtype):
    x, y = batch(n=20, d=4, classes=3, dtype=dtype, seed=4)
    got = loss_and_grads(lambda e: L.BatchAllTripletLoss(margin=0.25, average=average)(e, y), x)
    red = pml_reducers.AvgNonZeroReducer() if average == "nonzero" else pml_reducers.MeanReducer()
    pml = pml_losses.TripletMarginLoss(
        margin=0.25, distance=pml_distances.LpDistance(normalize_embeddings=False), reducer=red
    )
    assert_close_to_pml(got, loss_and_grads(lambda e: pml(e, y), x.to(torch.float64)), dtype)


def test_batch_all_equals_fastdml_triplet_margin_loss(backend):
    x, y = batch(n=18, d=3, classes=3, seed=5)
    a = loss_and_grads(lambda e: L.BatchAllTripletLoss(margin=0.2)(e, y), x)
    b = loss_and_grads(
        lambda e: L.TripletMarginLoss(margin=0.2, distance=D.LpDistance(normalize_embeddings=False))(e, y), x
    )
    assert_close_to_pml(a, b, torch.float64)


def test_batch_hard_equals_fastdml_miner_plus_loss(backend):
    x, y = batch(n=18, d=3, classes=3, seed=6)
    plain = D.LpDistance(normalize_embeddings=False)
    a = loss_and_grads(lambda e: L.BatchHardTripletLoss(margin=0.5)(e, y), x)
    b = loss_and_grads(
        lambda e: L.TripletMarginLoss(margin=0.5, distance=plain, reducer=R.MeanReducer())(
            e, y, M.BatchHardMiner(distance=plain)(e, y)
        ),
        x,
    )
    assert_close_to_pml(a, b, torch.float64)


# ---- dropped anchors, stats, options ----
@pytest.mark.parametrize("cls", [L.BatchHardTripletLoss, L.SemiHardTripletLoss, L.BatchAllTripletLoss])
def test_one_class_batch_gives_zero_loss_and_zero_grad_unlike_tf_addons(backend, cls):
    x, y = batch(n=8, d=3, seed=7, pattern="one_class")
    loss, (g,) = loss_and_grads(lambda e: cls()(e, y), x)
    assert float(loss) == 0.0 and torch.count_nonzero(g) == 0
    # TF-Addons' masked max/min give a one-class batch a non-zero loss (the documented difference)
    assert float(tfa_triplet_hard_loss(y, x)) > 0


def test_batch_hard_drops_anchors_without_positive(backend):
    # anchors 4 and 5 are singletons: they are dropped, the rest is the TF-Addons loss over the others
    x, y = batch(n=6, d=3, seed=8)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    loss = L.BatchHardTripletLoss(margin=0.5, collect_stats=True)
    val = loss(x, y)
    keep = torch.tensor([0, 1, 2, 3])
    pdist = tfa_pairwise_distance(x)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(6, dtype=torch.bool)
    hp = torch.where(pos, pdist, torch.zeros_like(pdist)).max(1).values
    hn = torch.where(~(y[:, None] == y[None, :]), pdist, torch.full_like(pdist, 1e9)).min(1).values
    want = F.relu(hp - hn + 0.5)[keep].mean()
    torch.testing.assert_close(val, want)
    assert loss.num_anchors == 4


def test_batch_hard_and_batch_all_stats(backend):
    x, y = batch(n=16, d=3, classes=3, seed=9)
    bh = L.BatchHardTripletLoss(margin=0.5, collect_stats=True)
    bh(x, y)
    per_anchor = L.BatchHardTripletLoss(margin=0.5, reducer=R.DoNothingReducer())(x, y)["loss"]["losses"]
    assert bh.num_anchors == len(per_anchor)
    assert bh.num_positive_triplets == int((per_anchor > 0).sum())
    assert bh.fraction_positive_triplets == pytest.approx(bh.num_positive_triplets / bh.num_anchors)
    ba = L.BatchAllTripletLoss(margin=0.2, collect_stats=True)
    ba(x, y)
    terms = L.BatchAllTripletLoss(margin=0.2, reducer=R.DoNothingReducer())(x, y)["loss"]["losses"]
    assert ba.num_valid_triplets == len(terms)
    assert ba.num_positive_triplets == int((terms > 0).sum())
    assert ba.fraction_positive_triplets == pytest.approx(ba.num_positive_triplets / ba.num_valid_triplets)
    sh = L.SemiHardTripletLoss(collect_stats=True)
    sh(x, y)
    assert sh.num_pos_pairs == int((y[:, None] == y[None, :]).sum() - len(y))
    terms = L.SemiHardTripletLoss(reducer=R.DoNothingReducer())(x, y)["loss"]["losses"]
    assert sh.num_positive_triplets == int((terms > 0).sum())
    assert sh.fraction_positive_triplets == pytest.approx(sh.num_positive_triplets / len(terms))


@pytest.mark.parametrize("cls", [L.BatchHardTripletLoss, L.SemiHardTripletLoss, L.BatchAllTripletLoss])
def test_one_pass_losses_reject_indices_tuple(cls):
    x, y = batch(n=6, d=3, seed=10)
    with pytest.raises(ValueError, match="indices_tuple"):
        cls()(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))


@pytest.mark.parametrize("cls", [L.BatchHardTripletLoss, L.SemiHardTripletLoss, L.BatchAllTripletLoss])
@pytest.mark.parametrize("dist", ["sq", "cosine", "dot"])
def test_one_pass_losses_accept_any_distance(backend, cls, dist):
    d = {
        "sq": D.LpDistance(power=2, normalize_embeddings=False),
        "cosine": D.CosineSimilarity(),
        "dot": D.DotProductSimilarity(normalize_embeddings=False),
    }[dist]
    x, y = batch(n=14, d=3, classes=3, seed=11)
    got = loss_and_grads(lambda e: cls(distance=d)(e, y), x)
    # the generic path (a distance subclass without a fused spec) computes the same numbers
    Sub = type("Sub", (type(d),), {})
    kw = {} if dist == "cosine" else {"normalize_embeddings": False}
    if dist == "sq":
        kw["power"] = 2
    want = loss_and_grads(lambda e: cls(distance=Sub(**kw))(e, y), x)
    assert_close_to_pml(got, want, torch.float64)


def test_one_pass_losses_with_ref_emb(backend):
    x, y = batch(n=10, d=3, classes=3, seed=12)
    r, z = batch(n=13, d=3, classes=3, seed=13)
    plain = D.LpDistance(normalize_embeddings=False)
    got = loss_and_grads(lambda e, f: L.BatchAllTripletLoss(margin=0.3)(e, y, None, f, z), x, r)
    want = loss_and_grads(lambda e, f: L.TripletMarginLoss(margin=0.3, distance=plain)(e, y, None, f, z), x, r)
    assert_close_to_pml(got, want, torch.float64)
    got = loss_and_grads(lambda e, f: L.BatchHardTripletLoss(margin=0.3)(e, y, None, f, z), x, r)
    want = loss_and_grads(
        lambda e, f: L.TripletMarginLoss(margin=0.3, distance=plain, reducer=R.MeanReducer())(
            e, y, M.BatchHardMiner(distance=plain)(e, y, f, z), f, z
        ),
        x,
        r,
    )
    assert_close_to_pml(got, want, torch.float64)

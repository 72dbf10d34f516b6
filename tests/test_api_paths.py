"""Which path a call takes: the fused defaults never build the N x M matrix or index lists in the API layer."""

import pytest
import torch

import fastdml
from fastdml import _common, reference
from fastdml import distances as D
from fastdml import losses as L
from fastdml import miners as M
from tests import api_cases as _cases
from tests.api_cases import batch

FUSED_CALLS = {
    "contrastive": lambda x, y: L.ContrastiveLoss()(x, y),
    "contrastive_cosine": lambda x, y: L.ContrastiveLoss(0.9, 0.3, distance=D.CosineSimilarity())(x, y),
    "triplet": lambda x, y: L.TripletMarginLoss()(x, y),
    "triplet_smooth_sq": lambda x, y: L.TripletMarginLoss(0.3, smooth_loss=True, distance=D.LpDistance(power=2))(x, y),
    "batch_hard": lambda x, y: L.BatchHardTripletLoss()(x, y),
    "batch_all": lambda x, y: L.BatchAllTripletLoss()(x, y),
    "semihard": lambda x, y: L.SemiHardTripletLoss()(x, y),
    "tm_miner+triplet": lambda x, y: L.TripletMarginLoss()(
        x, y, M.TripletMarginMiner(type_of_triplets="semihard")(x, y)
    ),
    "pm_miner+contrastive": lambda x, y: L.ContrastiveLoss()(x, y, M.PairMarginMiner()(x, y)),
    "bh_miner+triplet": lambda x, y: L.TripletMarginLoss()(x, y, M.BatchHardMiner()(x, y)),
    "eh_miner+contrastive": lambda x, y: L.ContrastiveLoss()(x, y, M.BatchEasyHardMiner()(x, y)),
}


@pytest.mark.parametrize("name", list(FUSED_CALLS))
def test_fused_paths_build_no_matrix_and_no_lists(name, monkeypatch):
    reason = _cases.backend_missing("blocked")
    if reason:
        pytest.skip(reason)

    def forbidden(*args, **kwargs):
        raise AssertionError("the fused path must not build the N x M matrix or list pairs/triplets")

    monkeypatch.setattr(_common.Geometry, "mat", property(forbidden))
    for fn in ("signed_distance_matrix", "triplet_list", "pair_list", "triplet_list_from_matrix"):
        monkeypatch.setattr(reference, fn, forbidden)
    for fn in ("triplet_list", "pair_list"):
        monkeypatch.setattr(fastdml.ops, fn, forbidden)
    x, y = batch(n=24, d=4, classes=4, seed=0)
    xl = x.clone().requires_grad_(True)
    with fastdml.use_backend("blocked"):
        loss = FUSED_CALLS[name](xl, y)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xl.grad).all()


def test_generic_distance_uses_its_own_matrix(monkeypatch):
    calls = []

    class Counting(D.LpDistance):  # a subclass: no fused spec, the object's own __call__
        def compute_mat(self, q, r):
            calls.append(q.shape)
            return super().compute_mat(q, r)

    x, y = batch(n=10, d=3, seed=1)
    L.ContrastiveLoss(distance=Counting())(x, y)
    assert calls == [torch.Size([10, 3])]

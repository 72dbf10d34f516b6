"""float16 on the CPU gives PML's numbers exactly where selections depend on them: ``LpDistance`` returns PML's
float16 matrix bit for bit, and every miner returns PML's index tuple (same entries, same order) on float16
embeddings, including points on a grid where margins tie exactly in float16 arithmetic. A miner's picks are
the ones PML's algorithm makes on ``distance(x)`` compared in float16. Losses on float16 stay
fp32-accumulated (tests/test_mixed_precision.py); with the kernels forced, miners keep the fused sweeps."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import fastdml
import fastdml.distances as fd_distances_module
from fastdml import dispatch, distances, miners
from fastdml.cross_batch_memory import CrossBatchMemory

H = torch.float16


def _circle(n, step_deg=1.0, start=0.0):
    """n unit vectors at equal angular steps: many pairs at exactly the same distance (ties in float16)."""
    t = torch.tensor([math.radians(start + step_deg * k) for k in range(n)], dtype=torch.float64)
    return torch.stack([torch.cos(t), torch.sin(t)], 1).to(H)


def _random(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(H), torch.randint(0, 4, (n,), generator=g)


def _labels(n, seed, classes=2):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _same(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert s.dtype == torch.int64 and torch.equal(s, t), (s.tolist(), t.tolist())


DISTANCES = {
    "l2": ({}, "LpDistance"),
    "l2_unnormalized": ({"normalize_embeddings": False}, "LpDistance"),
    "l1": ({"p": 1}, "LpDistance"),
    "sql2": ({"power": 2}, "LpDistance"),
    "cosine": ({}, "CosineSimilarity"),
    "dot": ({}, "DotProductSimilarity"),
}


def _pair(name):
    kwargs, cls = DISTANCES[name]
    return getattr(distances, cls)(**kwargs), getattr(pml_distances, cls)(**kwargs)


@pytest.mark.parametrize("name", list(DISTANCES))
@pytest.mark.parametrize("shape", [(16, None, 2), (33, 70, 128), (9, 9, 1000)])
def test_half_matrix_is_pmls_bit_for_bit(name, shape):
    n, m, d = shape
    x, _ = _random(n, d, 1)
    r = None if m is None else _random(m, d, 2)[0]
    fd, pml = _pair(name)
    got, want = fd(x, r), pml(x, r)
    assert got.dtype == H and torch.equal(got, want)


def test_half_matrix_in_row_chunks_is_unchanged(monkeypatch):
    x, _ = _random(37, 24, 3)
    whole = distances.LpDistance()(x)
    monkeypatch.setattr(fd_distances_module, "_HALF_CHUNK_ELEMS", 5 * 37 * 24)  # 5 rows per chunk
    assert torch.equal(distances.LpDistance()(x), whole)
    assert torch.equal(whole, pml_distances.LpDistance()(x))


def test_half_pairwise_distance_and_gradient_are_pmls():
    x, _ = _random(20, 16, 4)
    r, _ = _random(20, 16, 5)
    fd, pml = distances.LpDistance(), pml_distances.LpDistance()
    assert torch.equal(fd.pairwise_distance(x, r), pml.pairwise_distance(x, r))
    grads = []
    for dist in (fd, pml):
        xx = x.clone().requires_grad_(True)
        w = torch.linspace(-1, 1, 400, dtype=H).view(20, 20)
        (dist(xx) * w).sum().backward()
        grads.append(xx.grad.double())
    # each entry sums 2 * 20 float16-rounded terms (row and column side), in another order than PML's
    assert (grads[0] - grads[1]).abs().max() <= 2 * 20 * torch.finfo(H).eps * grads[1].abs().max()


def _triplet_cases():
    for t in ("all", "hard", "semihard", "easy"):
        for k in (-1, 0, 1, 2, 3, 7, 10):
            yield f"triplet_{t}_{k}", "TripletMarginMiner", {"margin": 0.05 * k, "type_of_triplets": t}


MINERS = list(_triplet_cases()) + [
    ("pair", "PairMarginMiner", {"pos_margin": 0.1, "neg_margin": 0.25}),
    ("pair_wide", "PairMarginMiner", {"pos_margin": 0.05, "neg_margin": 0.6}),
    ("batch_hard", "BatchHardMiner", {}),
    ("easy_hard_semihard", "BatchEasyHardMiner", {"pos_strategy": "easy", "neg_strategy": "semihard"}),
    ("easy_hard_hard_easy", "BatchEasyHardMiner", {"pos_strategy": "hard", "neg_strategy": "easy"}),
    ("easy_hard_ranges", "BatchEasyHardMiner", {"allowed_pos_range": (0.05, 0.2), "allowed_neg_range": (0.1, 0.3)}),
    ("multi_similarity", "MultiSimilarityMiner", {"epsilon": 0.05}),
]


def _both(cls, kwargs, dist_name):
    fd_dist, pml_dist = _pair(dist_name)
    return getattr(miners, cls)(distance=fd_dist, **kwargs), getattr(pml_miners, cls)(distance=pml_dist, **kwargs)


@pytest.mark.parametrize("dist_name", ["l2", "cosine"])
@pytest.mark.parametrize("case", MINERS, ids=[c[0] for c in MINERS])
def test_half_miners_pick_what_pml_picks_on_a_grid(case, dist_name):
    """Points 1 degree apart on a circle: d_an - d_ap is exactly 0 or a margin for many triplets in float16."""
    _, cls, kwargs = case
    x = _circle(16)
    for seed in range(2):
        y = _labels(16, seed)
        fd, pml = _both(cls, kwargs, dist_name)
        _same(tuple(fd(x, y)), pml(x, y))


@pytest.mark.parametrize("dist_name", ["l2", "dot", "l2_unnormalized"])
@pytest.mark.parametrize("case", MINERS[::5] + MINERS[-7:], ids=[c[0] for c in MINERS[::5] + MINERS[-7:]])
def test_half_miners_pick_what_pml_picks_with_ref_emb(case, dist_name):
    _, cls, kwargs = case
    x, y = _random(30, 12, 6)
    r, ry = _random(41, 12, 7)
    fd, pml = _both(cls, kwargs, dist_name)
    _same(tuple(fd(x, y)), pml(x, y))
    _same(tuple(fd(x, y, r, ry)), pml(x, y, r, ry))
    _same(fd.mine(x, y, r, ry), pml.mine(x, y, r, ry))


def test_triplet_miner_agrees_with_the_float16_rule_on_its_own_matrix():
    """The selection is PML's rule applied to ``distance(x)`` in float16: t = d_an - d_ap, t <= margin."""
    x = _circle(16)
    y = _labels(16, 0)
    dist = distances.LpDistance()
    mat = dist(x)
    for k in range(-1, 11):
        m = 0.05 * k
        got = set(zip(*[t.tolist() for t in miners.TripletMarginMiner(m, distance=dist)(x, y)]))
        want = {
            (a, p, n)
            for a in range(16)
            for p in range(16)
            for n in range(16)
            if p != a and y[p] == y[a] and y[n] != y[a] and bool(mat[a, n] - mat[a, p] <= m)
        }
        assert got == want


def test_half_rule_is_the_cpu_default_only():
    x = _circle(4)
    assert dispatch.miner_on_matrix(x)
    assert not dispatch.miner_on_matrix(x.float()) and not dispatch.miner_on_matrix(x.bfloat16())
    with fastdml.use_backend("triton"):
        assert not dispatch.miner_on_matrix(x)


def test_half_memory_with_inner_miner_matches_pml():
    """CrossBatchMemory + TripletMarginMiner on float16: the inner miner's picks against the memory are PML's,
    so the loss (PML's NTXentLoss on the same tuple) is PML's value exactly."""
    torch.manual_seed(0)
    fd = CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.1), 16, 40, miner=miners.TripletMarginMiner(0.1))
    pml = pml_losses.CrossBatchMemory(
        pml_losses.NTXentLoss(temperature=0.1), 16, 40, miner=pml_miners.TripletMarginMiner(0.1)
    )
    for step in range(5):
        x, y = _random(16, 16, 10 + step)
        got, want = fd(x, y), pml(x, y)
        assert torch.equal(got, want), (step, got.item(), want.item())


def test_memory_given_tuple_conflicting_with_the_miner_fails_as_in_pml():
    """A given tuple of batch indices is used as memory indices (PML's semantics): once the memory holds other
    rows, a pair can be positive in it and negative in the miner's tuple, and PML 2.9.0's mat-based losses
    reject it (AssertionError); fastdml's memory passes the same tuple on, so the same error comes back."""
    errors = []
    for memory in (CrossBatchMemory, pml_losses.CrossBatchMemory):
        torch.manual_seed(0)
        cbm = memory(pml_losses.MultiSimilarityLoss(), 8, 64, miner=pml_miners.MultiSimilarityMiner(0.3))
        outer = pml_miners.MultiSimilarityMiner(0.2)
        try:
            for _ in range(3):
                x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
                cbm(x, y, outer(x, y))
        except AssertionError as e:
            errors.append(str(e))
    assert len(errors) == 2 and errors[0] == errors[1] and "either be positive or negative" in errors[0]

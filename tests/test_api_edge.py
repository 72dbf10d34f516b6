"""Edge cases of the public API: nothing to compute, identical embeddings, NaN, sampled triplets, half precision."""

import math

import pytest
import torch

from fastdml import distances as D
from fastdml import losses as L
from fastdml import miners as M
from fastdml import reducers as R
from fastdml.losses import random_triplets
from tests import api_cases as _cases
from tests.api_cases import batch, loss_and_grads, pml_losses, pml_reducers

backend = _cases.backend  # the fixture: every available backend

ALL_LOSSES = {
    "contrastive": lambda: L.ContrastiveLoss(),
    "triplet": lambda: L.TripletMarginLoss(),
    "triplet_swap": lambda: L.TripletMarginLoss(swap=True),
    "triplet_sampled": lambda: L.TripletMarginLoss(triplets_per_anchor=3),
    "batch_hard": lambda: L.BatchHardTripletLoss(),
    "batch_all": lambda: L.BatchAllTripletLoss(),
    "semihard": lambda: L.SemiHardTripletLoss(),
}


NOTHING_CASES = [
    (name, case)
    for name in ALL_LOSSES
    for case in ["empty", "one_sample", "all_distinct_triplet", "one_class_triplet"]
    # (the contrastive loss has pairs to use in the last two)
    if not (name == "contrastive" and case in ("all_distinct_triplet", "one_class_triplet"))
]


@pytest.mark.parametrize("name,case", NOTHING_CASES)
def test_nothing_to_compute_gives_attached_zero_with_zero_grad(backend, name, case):
    if case == "empty":
        x, y = torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    elif case == "one_sample":
        x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([4])
    elif case == "all_distinct_triplet":
        x, y = batch(n=6, d=3, seed=0, pattern="distinct")
    else:
        x, y = batch(n=6, d=3, seed=0, pattern="one_class")
    xl = x.clone().requires_grad_(True)
    loss = ALL_LOSSES[name]()(xl, y)
    assert loss.requires_grad and loss.ndim == 0 and float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, xl)
    assert torch.count_nonzero(g) == 0


DIST_ALL = {
    "lp": lambda: D.LpDistance(),
    "lp_plain": lambda: D.LpDistance(normalize_embeddings=False),
    "lp_sq": lambda: D.LpDistance(power=2),
    "cosine": lambda: D.CosineSimilarity(),
    "dot": lambda: D.DotProductSimilarity(normalize_embeddings=False),
    "lp1": lambda: D.LpDistance(p=1),
}


@pytest.mark.parametrize("dist", list(DIST_ALL))
@pytest.mark.parametrize("name", ["contrastive", "triplet", "batch_hard", "batch_all", "semihard"])
def test_identical_embeddings_give_finite_gradients(backend, name, dist):
    x = torch.randn(1, 4, dtype=torch.float64).repeat(8, 1)
    x[4:] += 1.0  # two groups of identical points
    y = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    cls = {
        "contrastive": L.ContrastiveLoss,
        "triplet": L.TripletMarginLoss,
        "batch_hard": L.BatchHardTripletLoss,
        "batch_all": L.BatchAllTripletLoss,
        "semihard": L.SemiHardTripletLoss,
    }[name]
    loss, (g,) = loss_and_grads(lambda e: cls(distance=DIST_ALL[dist]())(e, y), x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def _nan_equal(a, b, rel):
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("red", ["default", "mean"])
@pytest.mark.parametrize("which", ["contrastive", "triplet"])
def test_nan_input_gives_pml_result_without_crash(backend, which, red, dtype):
    # PML's AvgNonZero drops NaN terms (NaN > 0 is False): the loss stays finite; a plain mean propagates NaN
    x, y = batch(n=10, d=3, classes=3, seed=1)
    x[3, 1] = float("nan")
    kw = {} if red == "default" else {"reducer": R.MeanReducer()}
    kw_pml = {} if red == "default" else {"reducer": pml_reducers.MeanReducer()}
    ours = (L.ContrastiveLoss if which == "contrastive" else L.TripletMarginLoss)(**kw)(x.to(dtype), y)
    theirs = (pml_losses.ContrastiveLoss if which == "contrastive" else pml_losses.TripletMarginLoss)(**kw_pml)(x, y)
    assert _nan_equal(float(ours), float(theirs), 1e-9 if dtype == torch.float64 else 1e-4)
    if red == "mean":
        assert math.isnan(float(ours))


@pytest.mark.parametrize("name", ["batch_hard", "batch_all", "semihard"])
def test_nan_input_one_pass_losses_do_not_crash(backend, name):
    x, y = batch(n=10, d=3, classes=3, seed=2)
    x[0, 0] = float("nan")
    loss = ALL_LOSSES[name]()(x, y)
    assert loss.ndim == 0


def test_nan_input_miners_do_not_crash(backend):
    x, y = batch(n=10, d=3, classes=3, seed=3)
    x[0, 0] = float("nan")
    for miner in [M.TripletMarginMiner(), M.PairMarginMiner(), M.BatchHardMiner(), M.BatchEasyHardMiner()]:
        out = tuple(miner(x, y))
        assert all(t.dtype == torch.int64 for t in out)


# ---- triplets_per_anchor: PML's distribution ----
def test_sampled_triplets_follow_pml_distribution():
    x, y = batch(n=12, d=3, classes=3, seed=4, pattern="pk")
    loss = L.TripletMarginLoss(triplets_per_anchor=5)
    inp = __import__("fastdml._common", fromlist=["resolve_inputs"]).resolve_inputs(x, y, None, None)
    counts_p = torch.zeros(12, 12)
    counts_n = torch.zeros(12, 12)
    trials = 300
    for _ in range(trials):
        a, p, n = random_triplets(inp, 5)
        assert len(a) == 12 * 5
        assert torch.equal(torch.bincount(a, minlength=12), torch.full((12,), 5))
        assert bool((y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all())
        counts_p.index_put_((a, p), torch.ones(len(a)), accumulate=True)
        counts_n.index_put_((a, n), torch.ones(len(a)), accumulate=True)
    # each anchor: 3 positives, 8 negatives, drawn uniformly: every cell near its expectation (5-sigma bound)
    for counts, k in ((counts_p, 3), (counts_n, 8)):
        expect = trials * 5 / k
        cells = counts[counts > 0]
        assert cells.numel() == 12 * k
        sigma = math.sqrt(trials * 5 * (1 / k) * (1 - 1 / k))
        assert float((cells - expect).abs().max()) < 5 * sigma
    # the loss on sampled triplets is the given-indices loss on those triplets
    torch.manual_seed(7)
    got = loss(x, y)
    torch.manual_seed(7)
    idx = random_triplets(inp, 5)
    torch.testing.assert_close(got, L.TripletMarginLoss()(x, y, idx))


def test_sampled_triplets_with_ref_emb():
    x, y = batch(n=8, d=3, classes=2, seed=5)
    r, z = batch(n=10, d=3, classes=2, seed=6)
    inp = __import__("fastdml._common", fromlist=["resolve_inputs"]).resolve_inputs(x, y, r, z)
    a, p, n = random_triplets(inp, 4)
    assert bool((y[a] == z[p]).all() and (y[a] != z[n]).all())
    assert len(a) == 8 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["contrastive", "triplet", "batch_hard", "semihard"])
def test_half_precision_runs_close_to_float64(backend, which, dtype):
    x, y = batch(n=12, d=4, classes=3, seed=7)
    make = {
        "contrastive": lambda: L.ContrastiveLoss(),
        "triplet": lambda: L.TripletMarginLoss(margin=0.3),
        "batch_hard": lambda: L.BatchHardTripletLoss(),
        "semihard": lambda: L.SemiHardTripletLoss(),
    }[which]
    got = make()(x.to(dtype), y)
    want = make()(x.to(dtype).double(), y)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_fastdml_calls_do_not_import_pml():
    # PML is only looked at for PML objects a user passes in (importing it costs ~0.6 s on the first call)
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from fastdml import losses as L, miners as M, reducers as R\n"
        "x = torch.randn(24, 5, requires_grad=True); y = torch.arange(24) % 4\n"
        "L.TripletMarginLoss()(x, y, M.BatchHardMiner()(x, y)).backward()\n"
        "L.ContrastiveLoss(reducer=R.MeanReducer())(x, y).backward()\n"
        "L.TripletMarginLoss(reducer=R.DoNothingReducer())(x, y, M.TripletMarginMiner()(x, y))\n"
        "print(sorted(m for m in sys.modules if m.startswith('pytorch_metric_learning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout

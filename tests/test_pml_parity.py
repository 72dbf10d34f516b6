"""fastdml's losses, miners, distances and reducers against pytorch-metric-learning: same numbers and gradients.

fastdml runs in float64 (tolerance 1e-9) and float32 (rtol 1e-4 / atol 1e-5) on every available backend;
PML runs in float64 (see tests/api_cases.py for why).
"""

import math

import pytest
import torch

import fastdml
from fastdml import distances as D
from fastdml import losses as L
from fastdml import miners as M
from fastdml import reducers as R
from tests import api_cases as _cases
from tests.api_cases import (
    CONTRASTIVE_MARGINS,
    DISTANCES,
    REDUCERS,
    assert_close_to_pml,
    batch,
    loss_and_grads,
    pml_distances,
    pml_losses,
    pml_miners,
    pml_reducers,
    same_indices,
)
from tests.conftest import TOL

backend = _cases.backend  # the fixture: every available backend

DTYPES = [torch.float64, torch.float32]


def _pml_ref(fn, *tensors):
    return loss_and_grads(fn, *[t.to(torch.float64) for t in tensors])


# ---------------------------------------------------------------------------------------------------------
# ContrastiveLoss
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_contrastive_all_pairs_matches_pml_for_every_distance(backend, dist, dtype):
    pm, nm = CONTRASTIVE_MARGINS[dist]
    fd, pd = DISTANCES[dist]
    x, y = batch(n=30, d=5, classes=4, dtype=dtype, seed=1)
    ours = L.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=fd())
    theirs = pml_losses.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=pd())
    got = loss_and_grads(lambda e: ours(e, y), x)
    want = _pml_ref(lambda e: theirs(e, y), x)
    assert_close_to_pml(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", list(REDUCERS))
@pytest.mark.parametrize("dist", ["lp", "cosine", "lp1_generic"])
def test_contrastive_matches_pml_for_every_reducer(backend, red, dist, dtype):
    pm, nm = CONTRASTIVE_MARGINS[dist]
    fd, pd = DISTANCES[dist]
    fr, pr = REDUCERS[red]
    x, y = batch(n=18, d=3, classes=3, dtype=dtype, seed=2)
    ours = L.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=fd(), reducer=fr())
    theirs = pml_losses.ContrastiveLoss(pos_margin=pm, neg_margin=nm, distance=pd(), reducer=pr())
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), dtype)


def test_contrastive_with_multiple_reducers_per_sub_loss_matches_pml(backend):
    x, y = batch(n=20, d=4, classes=3, seed=3)
    ours = L.ContrastiveLoss(
        pos_margin=0.3,
        reducer=R.MultipleReducers({"pos_loss": R.MeanReducer(), "neg_loss": R.SumReducer()}),
    )
    theirs = pml_losses.ContrastiveLoss(
        pos_margin=0.3,
        reducer=pml_reducers.MultipleReducers(
            {"pos_loss": pml_reducers.MeanReducer(), "neg_loss": pml_reducers.SumReducer()}
        ),
    )
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["pk", "one_class", "distinct", "imbalanced"])
def test_contrastive_label_patterns_match_pml(backend, pattern, dtype):
    x, y = batch(n=24, d=3, classes=4, dtype=dtype, seed=4, pattern=pattern)
    ours, theirs = L.ContrastiveLoss(), pml_losses.ContrastiveLoss()
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), dtype)


# ---------------------------------------------------------------------------------------------------------
# TripletMarginLoss
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", list(DISTANCES))
@pytest.mark.parametrize("opts", [dict(), dict(margin=0.3), dict(margin=0.2, smooth_loss=True), dict(swap=True)])
def test_triplet_all_triplets_matches_pml(backend, dist, opts, dtype):
    fd, pd = DISTANCES[dist]
    if dist in ("lp_sq", "lp_cube_generic") and "margin" not in opts:
        opts = dict(opts, margin=0.4)
    x, y = batch(n=20, d=4, classes=3, dtype=dtype, seed=5)
    ours = L.TripletMarginLoss(distance=fd(), **opts)
    theirs = pml_losses.TripletMarginLoss(distance=pd(), **opts)
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", list(REDUCERS))
def test_triplet_matches_pml_for_every_reducer(backend, red, dtype):
    fr, pr = REDUCERS[red]
    x, y = batch(n=16, d=3, classes=3, dtype=dtype, seed=6)
    ours = L.TripletMarginLoss(margin=0.4, reducer=fr())
    theirs = pml_losses.TripletMarginLoss(margin=0.4, reducer=pr())
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["pk", "one_class", "distinct", "imbalanced"])
def test_triplet_label_patterns_match_pml(backend, pattern, dtype):
    x, y = batch(n=24, d=3, classes=4, dtype=dtype, seed=7, pattern=pattern)
    ours, theirs = L.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3)
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), dtype)


# ---------------------------------------------------------------------------------------------------------
# ref_emb: rectangular, and PML's "diagonal excluded iff ref_labels is labels"
# ---------------------------------------------------------------------------------------------------------
REF_MODES = ["separate", "same_labels_object", "emb_as_ref_labels_copy", "ref_emb_no_ref_labels"]


def _ref_call(mode, loss, x, y, r, z):
    if mode == "separate":
        return loss(x, y, ref_emb=r, ref_labels=z)
    if mode == "same_labels_object":
        return loss(x, y, ref_emb=r, ref_labels=y)
    if mode == "emb_as_ref_labels_copy":
        return loss(x, y, ref_emb=x, ref_labels=y.clone())
    return loss(x, y, ref_emb=r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", REF_MODES)
@pytest.mark.parametrize("which", ["contrastive", "triplet", "triplet_cos"])
def test_losses_with_ref_emb_match_pml(backend, which, mode, dtype):
    x, y = batch(n=14, d=3, classes=3, dtype=dtype, seed=8)
    n_ref = 14 if mode in ("same_labels_object", "ref_emb_no_ref_labels") else 11
    r, z = batch(n=n_ref, d=3, classes=3, dtype=dtype, seed=9)
    if which == "contrastive":
        ours, theirs = L.ContrastiveLoss(pos_margin=0.1), pml_losses.ContrastiveLoss(pos_margin=0.1)
    elif which == "triplet":
        ours, theirs = L.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3)
    else:
        ours = L.TripletMarginLoss(margin=0.2, distance=D.CosineSimilarity())
        theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_distances.CosineSimilarity())
    got = loss_and_grads(lambda e, f: _ref_call(mode, ours, e, y, f, z), x, r)
    want = _pml_ref(lambda e, f: _ref_call(mode, theirs, e, y, f, z), x, r)
    assert_close_to_pml(got, want, dtype)


# ---------------------------------------------------------------------------------------------------------
# given indices (PML's miners feeding fastdml's losses)
# ---------------------------------------------------------------------------------------------------------
PML_MINERS = {
    "triplet_all": lambda: pml_miners.TripletMarginMiner(margin=0.3),
    "triplet_semihard": lambda: pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.9),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
    "easy_hard": lambda: pml_miners.BatchEasyHardMiner(),
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("miner", list(PML_MINERS))
@pytest.mark.parametrize("which", ["contrastive", "triplet", "triplet_swap"])
def test_losses_on_given_indices_match_pml(backend, miner, which, dtype):
    x, y = batch(n=20, d=4, classes=3, dtype=dtype, seed=10)
    idx = PML_MINERS[miner]()(x.to(torch.float64), y)
    if which == "contrastive":
        ours, theirs = L.ContrastiveLoss(pos_margin=0.1), pml_losses.ContrastiveLoss(pos_margin=0.1)
    else:
        swap = which == "triplet_swap"
        ours, theirs = L.TripletMarginLoss(margin=0.3, swap=swap), pml_losses.TripletMarginLoss(margin=0.3, swap=swap)
    got = loss_and_grads(lambda e: ours(e, y, idx), x)
    want = _pml_ref(lambda e: theirs(e, y, idx), x)
    assert_close_to_pml(got, want, dtype)


def test_losses_accept_labels_none_with_indices_like_pml(backend):
    x, y = batch(n=12, d=3, seed=11)
    idx = pml_miners.TripletMarginMiner(margin=0.5)(x, y)
    for ours, theirs in [
        (L.TripletMarginLoss(margin=0.2), pml_losses.TripletMarginLoss(margin=0.2)),
        (L.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
    ]:
        got = loss_and_grads(lambda e, f=ours: f(e, None, idx), x)
        want = _pml_ref(lambda e, f=theirs: f(e, None, idx), x)
        assert_close_to_pml(got, want, torch.float64)


def test_contrastive_single_pair_quirk_matches_pml(backend):
    # PML returns zero when every index list holds at most one pair
    x, y = batch(n=6, d=3, seed=12)
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3]))
    got = loss_and_grads(lambda e: L.ContrastiveLoss()(e, None, idx), x)
    want = _pml_ref(lambda e: pml_losses.ContrastiveLoss()(e, None, idx), x)
    assert_close_to_pml(got, want, torch.float64)
    assert float(got[0]) == 0.0
    # the same quirk on the fused path: a rectangular batch with exactly one positive and one negative pair
    x2 = torch.randn(1, 3, dtype=torch.float64)
    r2 = torch.randn(2, 3, dtype=torch.float64)
    y2, z2 = torch.tensor([0]), torch.tensor([0, 1])
    ours = loss_and_grads(lambda e, f: L.ContrastiveLoss(pos_margin=0.0, neg_margin=5.0)(e, y2, None, f, z2), x2, r2)
    theirs = _pml_ref(
        lambda e, f: pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=5.0)(e, y2, None, f, z2), x2, r2
    )
    assert_close_to_pml(ours, theirs, torch.float64)
    # and on the batch-hard miner's single pair (one anchor): fused row pairs, zero as PML
    ours = loss_and_grads(
        lambda e, f: L.ContrastiveLoss(neg_margin=5.0)(e, y2, M.BatchHardMiner()(e, y2, f, z2), f, z2), x2, r2
    )
    theirs = _pml_ref(
        lambda e, f: pml_losses.ContrastiveLoss(neg_margin=5.0)(
            e, y2, pml_miners.BatchHardMiner()(e, y2, f, z2), f, z2
        ),
        x2,
        r2,
    )
    assert_close_to_pml(ours, theirs, torch.float64)
    assert float(ours[0]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# DoNothingReducer, embedding regularizer, stats
# ---------------------------------------------------------------------------------------------------------
def _assert_same_loss_dict(a, b):
    assert set(a) == set(b)
    for k in a:
        la, lb = a[k]["losses"], b[k]["losses"]
        assert a[k]["reduction_type"] == b[k]["reduction_type"]
        if torch.is_tensor(lb):
            torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
            ia, ib = a[k]["indices"], b[k]["indices"]
            assert same_indices(ia, ib)
        else:
            assert la == lb


@pytest.mark.parametrize("which", ["contrastive", "triplet"])
def test_do_nothing_reducer_returns_pml_loss_dict(backend, which):
    x, y = batch(n=10, d=3, seed=13)
    if which == "contrastive":
        a = L.ContrastiveLoss(reducer=R.DoNothingReducer())(x, y)
        b = pml_losses.ContrastiveLoss(reducer=pml_reducers.DoNothingReducer())(x, y)
    else:
        a = L.TripletMarginLoss(reducer=pml_reducers.DoNothingReducer())(x, y)
        b = pml_losses.TripletMarginLoss(reducer=pml_reducers.DoNothingReducer())(x, y)
    _assert_same_loss_dict(a, b)


def test_custom_reducer_gets_pml_loss_dict(backend):
    seen = {}

    class Custom(pml_reducers.MeanReducer):
        def element_reduction(self, losses, *args):
            seen.setdefault("n", []).append(len(losses))
            return (losses**2).mean()

    x, y = batch(n=12, d=3, seed=14)
    got = loss_and_grads(lambda e: L.TripletMarginLoss(margin=0.3, reducer=Custom())(e, y), x)
    n_ours = list(seen["n"])
    seen.clear()
    want = _pml_ref(lambda e: pml_losses.TripletMarginLoss(margin=0.3, reducer=Custom())(e, y), x)
    assert n_ours == seen["n"]
    assert_close_to_pml(got, want, torch.float64)


@pytest.mark.parametrize("which", ["contrastive", "triplet"])
def test_embedding_regularizer_matches_pml(backend, which):
    from pytorch_metric_learning.regularizers import LpRegularizer

    x, y = batch(n=12, d=3, seed=15, scale=2.0)
    cls_ours = L.ContrastiveLoss if which == "contrastive" else L.TripletMarginLoss
    cls_pml = pml_losses.ContrastiveLoss if which == "contrastive" else pml_losses.TripletMarginLoss
    ours = cls_ours(embedding_regularizer=LpRegularizer(), embedding_reg_weight=0.3)
    theirs = cls_pml(embedding_regularizer=LpRegularizer(), embedding_reg_weight=0.3)
    assert_close_to_pml(loss_and_grads(lambda e: ours(e, y), x), _pml_ref(lambda e: theirs(e, y), x), torch.float64)


def test_threshold_reducer_stats_match_pml(backend):
    x, y = batch(n=12, d=3, seed=16)
    ours = L.TripletMarginLoss(margin=0.4, reducer=R.ThresholdReducer(low=0.1, collect_stats=True))
    theirs = pml_losses.TripletMarginLoss(
        margin=0.4, reducer=pml_reducers.ThresholdReducer(low=0.1, collect_stats=True)
    )
    a, b = ours(x, y, theirs_idx := pml_miners.TripletMarginMiner(margin=1.0)(x, y)), theirs(x, y, theirs_idx)
    torch.testing.assert_close(a, b)
    assert ours.reducer.num_past_filter == theirs.reducer.num_past_filter
    assert ours.reducer.num_above_low == theirs.reducer.num_above_low


# ---------------------------------------------------------------------------------------------------------
# miners
# ---------------------------------------------------------------------------------------------------------
MINER_CASES = {
    "tm_all": (lambda m: m.TripletMarginMiner(margin=0.3), {}),
    "tm_hard": (lambda m: m.TripletMarginMiner(margin=0.3, type_of_triplets="hard"), {}),
    "tm_semihard": (lambda m: m.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"), {}),
    "tm_easy": (lambda m: m.TripletMarginMiner(margin=0.3, type_of_triplets="easy"), {}),
    "tm_neg_margin_hard": (lambda m: m.TripletMarginMiner(margin=-0.1, type_of_triplets="hard"), {}),
    "pair_margin": (lambda m: m.PairMarginMiner(), {}),
    "pair_margin_custom": (lambda m: m.PairMarginMiner(pos_margin=0.5, neg_margin=1.2), {}),
    "batch_hard": (lambda m: m.BatchHardMiner(), {}),
    "eh_default": (lambda m: m.BatchEasyHardMiner(), {}),
    "eh_hard_hard": (lambda m: m.BatchEasyHardMiner(pos_strategy="hard", neg_strategy="hard"), {}),
    "eh_semihard_pos": (lambda m: m.BatchEasyHardMiner(pos_strategy="semihard", neg_strategy="hard"), {}),
    "eh_easy_easy": (lambda m: m.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="easy"), {}),
    "eh_all_hard": (lambda m: m.BatchEasyHardMiner(pos_strategy="all", neg_strategy="hard"), {}),
    "eh_easy_all": (lambda m: m.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="all"), {}),
    "eh_ranges": (
        lambda m: m.BatchEasyHardMiner(
            pos_strategy="hard", neg_strategy="semihard", allowed_pos_range=(0.2, 1.5), allowed_neg_range=(0.3, 1.9)
        ),
        {},
    ),
    "multi_similarity": (lambda m: m.MultiSimilarityMiner(), {}),
    "multi_similarity_lp": (lambda m: m.MultiSimilarityMiner(epsilon=0.3), {"dist": "lp"}),
}


def _miner_pair(case, dist):
    make, extra = MINER_CASES[case]
    dist = extra.get("dist", dist)
    ours, theirs = make(M), make(pml_miners)
    if dist is not None:
        fd, pd = DISTANCES[dist]
        ours.distance, theirs.distance = fd(), pd()
    return ours, theirs


@pytest.mark.parametrize("dist", [None, "lp_plain", "cosine", "dot_plain", "lp1_generic"])
@pytest.mark.parametrize("case", list(MINER_CASES))
def test_miners_return_pml_indices(backend, case, dist):
    if dist == "dot_plain" and case.startswith("pair_margin"):
        dist = "cosine"
    x, y = batch(n=20, d=3, classes=3, seed=17)
    ours, theirs = _miner_pair(case, dist)
    got = ours(x, y)
    want = theirs(x, y)
    assert len(got) == len(want)
    assert same_indices(got, want)
    if len(want) == 3:
        assert ours.num_triplets == theirs.num_triplets
    else:
        assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("margin", [0.0, -1e-30, 1e-30, 2.0])
def test_triplet_miner_exact_ties_match_pml(backend, kind, margin, dtype):
    # 1-D normalized embeddings are +-1: every distance is exactly 0 or 2, so t = d_an - d_ap is exactly
    # -2, 0 or 2 and a band edge at 0 (or a margin a hair away from it) decides by the strict/non-strict rule
    x = torch.tensor([[1.5], [-0.3], [-2.2], [0.6], [0.9]], dtype=dtype)
    y = torch.tensor([1, 1, 1, 0, 0])
    got = M.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x, y)
    want = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x, y)
    assert same_indices(got, want)
    loss = L.TripletMarginLoss(margin=0.1)
    res = M.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x, y)
    torch.testing.assert_close(loss(x, y, res), pml_losses.TripletMarginLoss(margin=0.1)(x, y, want), **TOL[dtype])


@pytest.mark.parametrize("mode", REF_MODES)
@pytest.mark.parametrize("case", ["tm_all", "pair_margin", "batch_hard", "eh_semihard_pos", "multi_similarity"])
def test_miners_with_ref_emb_return_pml_indices(backend, case, mode):
    x, y = batch(n=12, d=3, classes=3, seed=18)
    n_ref = 12 if mode in ("same_labels_object", "ref_emb_no_ref_labels") else 9
    r, z = batch(n=n_ref, d=3, classes=3, seed=19)
    ours, theirs = _miner_pair(case, None)
    assert same_indices(_ref_call(mode, ours, x, y, r, z), _ref_call(mode, theirs, x, y, r, z))


def test_miner_stats_match_pml(backend):
    x, y = batch(n=16, d=3, classes=3, seed=20)
    for make in [
        lambda m: m.TripletMarginMiner(margin=0.3, collect_stats=True),
        lambda m: m.PairMarginMiner(collect_stats=True),
        lambda m: m.BatchEasyHardMiner(collect_stats=True),
        lambda m: m.BatchEasyHardMiner(pos_strategy="all", neg_strategy="hard", collect_stats=True),
    ]:
        ours, theirs = make(M), make(pml_miners)
        ours(x, y)
        theirs(x, y)
        names = [
            "pos_pair_dist",
            "neg_pair_dist",
            "avg_triplet_margin",
            "easiest_triplet",
            "hardest_triplet",
            "easiest_pos_pair",
            "hardest_pos_pair",
            "easiest_neg_pair",
            "hardest_neg_pair",
        ]
        for name in names:
            if hasattr(theirs, name):
                assert math.isclose(getattr(ours, name), getattr(theirs, name), rel_tol=1e-9, abs_tol=1e-12), name


# ---------------------------------------------------------------------------------------------------------
# fastdml miner + fastdml loss (lazy, fused) == PML miner + PML loss
# ---------------------------------------------------------------------------------------------------------
FUSED_COMBOS = {
    "tm_all+triplet": ("tm_all", "triplet"),
    "tm_hard+triplet": ("tm_hard", "triplet"),
    "tm_semihard+triplet": ("tm_semihard", "triplet"),
    "tm_easy+triplet": ("tm_easy", "triplet"),
    "pair_margin+contrastive": ("pair_margin", "contrastive"),
    "batch_hard+triplet": ("batch_hard", "triplet"),
    "batch_hard+contrastive": ("batch_hard", "contrastive"),
    "eh_default+triplet": ("eh_default", "triplet"),
    "eh_default+contrastive": ("eh_default", "contrastive"),
    "tm_all+contrastive": ("tm_all", "contrastive"),
    "pair_margin+triplet": ("pair_margin", "triplet"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", [None, "cosine"])
@pytest.mark.parametrize("combo", list(FUSED_COMBOS))
def test_fastdml_miner_plus_loss_matches_pml(backend, combo, dist, dtype):
    case, which = FUSED_COMBOS[combo]
    x, y = batch(n=20, d=3, classes=3, dtype=dtype, seed=21)
    m_ours, m_theirs = _miner_pair(case, dist)
    if which == "triplet":
        ours, theirs = L.TripletMarginLoss(margin=0.2), pml_losses.TripletMarginLoss(margin=0.2)
    else:
        ours, theirs = L.ContrastiveLoss(pos_margin=0.1), pml_losses.ContrastiveLoss(pos_margin=0.1)
    if dist is not None:
        fd, pd = DISTANCES[dist]
        ours.distance, theirs.distance = fd(), pd()

    def run_ours(e):
        return ours(e, y, m_ours(e, y))

    def run_theirs(e):
        return theirs(e, y, m_theirs(e, y))

    assert_close_to_pml(loss_and_grads(run_ours, x), _pml_ref(run_theirs, x), dtype)


# ---------------------------------------------------------------------------------------------------------
# distances and reducers themselves
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_distance_matrices_match_pml(dist):
    fd, pd = DISTANCES[dist]
    x, _ = batch(n=9, d=4, seed=22)
    r, _ = batch(n=7, d=4, seed=23)

    def weighted(make):
        def f(*t):
            m = make()(*t)
            return (m * torch.linspace(-1, 1, m.numel(), dtype=m.dtype).reshape(m.shape)).sum()

        return f

    for args in [(x,), (x, r)]:
        assert_close_to_pml(loss_and_grads(weighted(fd), *args), loss_and_grads(weighted(pd), *args), torch.float64)
    torch.testing.assert_close(fd()(x, r), pd()(x, r), atol=1e-12, rtol=1e-12)
    # PML's LpDistance.pairwise_distance is F.pairwise_distance, which adds eps = 1e-6 to every difference;
    # fastdml's is exact (0 for identical rows): equal up to that eps
    torch.testing.assert_close(
        fd().pairwise_distance(x, x.flip(0)), pd().pairwise_distance(x, x.flip(0)), atol=1e-5, rtol=1e-5
    )
    if not fd().is_inverted:
        assert float(fd().pairwise_distance(x[:1], x[:1])[0]) == 0.0
    a, b = torch.tensor([0.3, 0.9]), torch.tensor([0.5, 0.1])
    torch.testing.assert_close(fd().margin(a, b), pd().margin(a, b))
    torch.testing.assert_close(fd().smallest_dist(a, b), pd().smallest_dist(a, b))
    torch.testing.assert_close(fd().largest_dist(a, b), pd().largest_dist(a, b))
    assert fd().is_inverted == pd().is_inverted


def test_distance_stats_match_pml():
    x, _ = batch(n=9, d=4, seed=24, scale=3.0)
    ours, theirs = D.LpDistance(collect_stats=True), pml_distances.LpDistance(collect_stats=True)
    ours(x)
    theirs(x)
    for name in ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm"]:
        assert math.isclose(getattr(ours, name), getattr(theirs, name), rel_tol=1e-12)


def test_l2_matrix_is_exact_for_near_duplicates_in_float32():
    # PML's cdist (expansion above 25 rows) is off by ~1e-4 here; fastdml matches the float64 result
    g = torch.Generator().manual_seed(25)
    base = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x64 = torch.cat([base, base + 1e-5 * torch.randn(40, 3, generator=g, dtype=torch.float64)])
    x32 = x64.float()
    got = D.LpDistance(normalize_embeddings=False)(x32)
    want = D.LpDistance(normalize_embeddings=False)(x32.double())
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("red", ["mean", "sum", "avgnonzero", "threshold"])
@pytest.mark.parametrize("rtype", ["element", "pos_pair", "triplet"])
def test_reducers_reduce_pml_loss_dicts_as_pml(red, rtype):
    fr, pr = REDUCERS[red]
    x, _ = batch(n=8, d=3, seed=26)
    losses = torch.relu(torch.randn(10, dtype=torch.float64))
    idx = torch.arange(10)
    indices = {"element": idx, "pos_pair": (idx, idx), "triplet": (idx, idx, idx)}[rtype]
    d = {"loss": {"losses": losses, "indices": indices, "reduction_type": rtype}}
    torch.testing.assert_close(fr()(d, x, None), pr()(d, x, None))
    zero = {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    assert float(fr()(zero, x, None)) == 0.0


def test_reducer_windows_of_pml_objects():
    assert R.reducer_window(pml_reducers.MeanReducer()) == (-math.inf, math.inf, True)
    assert R.reducer_window(pml_reducers.SumReducer()) == (-math.inf, math.inf, False)
    assert R.reducer_window(pml_reducers.AvgNonZeroReducer()) == (0.0, math.inf, True)
    assert R.reducer_window(pml_reducers.ThresholdReducer(high=2.0)) == (-math.inf, 2.0, True)
    assert R.reducer_window(pml_reducers.DoNothingReducer()) is None
    assert R.reducer_window(R.ThresholdReducer(low=0.5, high=1.5)) == (0.5, 1.5, True)


def test_fused_spec_maps_fastdml_and_pml_distances():
    assert D.fused_spec(D.LpDistance()) == ("l2", True)
    assert D.fused_spec(pml_distances.LpDistance(normalize_embeddings=False)) == ("l2", False)
    assert D.fused_spec(pml_distances.LpDistance(power=2)) == ("sql2", True)
    assert D.fused_spec(D.CosineSimilarity()) == ("dot", True)
    assert D.fused_spec(pml_distances.DotProductSimilarity(normalize_embeddings=False)) == ("dot", False)
    assert D.fused_spec(pml_distances.LpDistance(p=1)) is None
    assert D.fused_spec(D.LpDistance(power=3)) is None
    assert D.fused_spec(pml_distances.SNRDistance()) is None

    class Sub(D.LpDistance):
        pass

    assert D.fused_spec(Sub()) is None


def test_backend_fixture_runs_the_requested_backend(backend):
    assert fastdml.dispatch.requested_backend() == backend


@pytest.mark.parametrize("dtype", DTYPES)
def test_pml_distance_and_reducer_objects_work_in_fastdml_losses_and_miners(backend, dtype):
    x, y = batch(n=16, d=3, classes=3, dtype=dtype, seed=27)
    pd = pml_distances.CosineSimilarity()
    cases = [
        (
            L.ContrastiveLoss(
                pos_margin=0.9, neg_margin=0.2, distance=pd, reducer=pml_reducers.ThresholdReducer(high=0.5)
            ),
            pml_losses.ContrastiveLoss(
                pos_margin=0.9, neg_margin=0.2, distance=pd, reducer=pml_reducers.ThresholdReducer(high=0.5)
            ),
        ),
        (
            L.TripletMarginLoss(
                margin=0.2, distance=pml_distances.LpDistance(power=2), reducer=pml_reducers.SumReducer()
            ),
            pml_losses.TripletMarginLoss(
                margin=0.2, distance=pml_distances.LpDistance(power=2), reducer=pml_reducers.SumReducer()
            ),
        ),
        (
            L.ContrastiveLoss(
                reducer=pml_reducers.MultipleReducers(
                    {"neg_loss": pml_reducers.SumReducer()}, default_reducer=pml_reducers.AvgNonZeroReducer()
                )
            ),
            pml_losses.ContrastiveLoss(
                reducer=pml_reducers.MultipleReducers(
                    {"neg_loss": pml_reducers.SumReducer()}, default_reducer=pml_reducers.AvgNonZeroReducer()
                )
            ),
        ),
    ]
    for ours, theirs in cases:
        got = loss_and_grads(lambda e, f=ours: f(e, y), x)
        want = _pml_ref(lambda e, f=theirs: f(e, y), x)
        assert_close_to_pml(got, want, dtype)
    x64 = x.to(torch.float64)
    for mk in [lambda m: m.TripletMarginMiner(margin=0.1, distance=pd), lambda m: m.BatchHardMiner(distance=pd)]:
        assert same_indices(mk(M)(x64, y), mk(pml_miners)(x64, y))


def test_do_nothing_reducer_with_embedding_regularizer_matches_pml(backend):
    from pytorch_metric_learning.regularizers import LpRegularizer

    x, y = batch(n=10, d=3, seed=28)
    a = L.TripletMarginLoss(reducer=R.DoNothingReducer(), embedding_regularizer=LpRegularizer())(x, y)
    b = pml_losses.TripletMarginLoss(reducer=pml_reducers.DoNothingReducer(), embedding_regularizer=LpRegularizer())(
        x, y
    )
    _assert_same_loss_dict(
        {k: v for k, v in a.items() if k != "embedding_reg_loss"},
        {k: v for k, v in b.items() if k != "embedding_reg_loss"},
    )
    torch.testing.assert_close(a["embedding_reg_loss"]["losses"], b["embedding_reg_loss"]["losses"])


def test_fastdml_distances_and_reducers_work_inside_pml_losses():
    x, y = batch(n=14, d=3, classes=3, seed=29)
    cases = [
        (
            pml_losses.ContrastiveLoss(distance=D.CosineSimilarity(), reducer=R.ThresholdReducer(low=0.1)),
            pml_losses.ContrastiveLoss(
                distance=pml_distances.CosineSimilarity(), reducer=pml_reducers.ThresholdReducer(low=0.1)
            ),
        ),
        (
            pml_losses.TripletMarginLoss(margin=0.3, distance=D.LpDistance(power=2), reducer=R.SumReducer()),
            pml_losses.TripletMarginLoss(
                margin=0.3, distance=pml_distances.LpDistance(power=2), reducer=pml_reducers.SumReducer()
            ),
        ),
        (
            pml_losses.ContrastiveLoss(reducer=R.MultipleReducers({"neg_loss": R.SumReducer()})),
            pml_losses.ContrastiveLoss(reducer=pml_reducers.MultipleReducers({"neg_loss": pml_reducers.SumReducer()})),
        ),
    ]
    for ours, theirs in cases:
        got = loss_and_grads(lambda e, f=ours: f(e, y), x)
        want = loss_and_grads(lambda e, f=theirs: f(e, y), x)
        assert_close_to_pml(got, want, torch.float64)

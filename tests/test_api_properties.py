"""Property-based parity with PML over shapes, label patterns, margins and ref_emb (hypothesis, small budgets)."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdml
from fastdml import losses as L
from fastdml import miners as M
from tests.api_cases import backend_missing, pml_losses, pml_miners, same_indices

BACKENDS = ["reference", "blocked"]
# derandomized: the same examples every run (CI stays reproducible; failures are real, never flaky)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, with_ref=False):
    n = draw(st.integers(0, 14))
    d = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    if not with_ref:
        return x, y, None, None
    m = draw(st.integers(1, 12))
    r = torch.randn(m, d, generator=g, dtype=torch.float64)
    z = torch.randint(0, classes, (m,), generator=g)
    return x, y, r, z


def _run(fn, x, r):
    xl = x.clone().requires_grad_(True)
    rl = None if r is None else r.clone().requires_grad_(True)
    out = fn(xl, rl)
    leaves = [xl] + ([] if rl is None else [rl])
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _check(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-9, rtol=1e-9)
    for u, v in zip(a[1], b[1]):
        torch.testing.assert_close(u, v, atol=1e-9, rtol=1e-9)


def _use(name):
    reason = backend_missing(name)
    if reason:
        pytest.skip(reason)
    return fastdml.use_backend(name)


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(data=batches(with_ref=True), use_ref=st.booleans(), pm=st.floats(0.0, 0.5), nm=st.floats(0.6, 1.9))
def test_contrastive_property(name, data, use_ref, pm, nm):
    x, y, r, z = data
    r, z = (r, z) if use_ref else (None, None)
    with _use(name):
        a = _run(lambda e, f: L.ContrastiveLoss(pos_margin=pm, neg_margin=nm)(e, y, None, f, z), x, r)
    b = _run(lambda e, f: pml_losses.ContrastiveLoss(pos_margin=pm, neg_margin=nm)(e, y, None, f, z), x, r)
    _check(a, b)


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(data=batches(with_ref=True), use_ref=st.booleans(), margin=st.floats(0.01, 1.0), smooth=st.booleans())
def test_triplet_property(name, data, use_ref, margin, smooth):
    x, y, r, z = data
    r, z = (r, z) if use_ref else (None, None)
    with _use(name):
        a = _run(lambda e, f: L.TripletMarginLoss(margin=margin, smooth_loss=smooth)(e, y, None, f, z), x, r)
    b = _run(lambda e, f: pml_losses.TripletMarginLoss(margin=margin, smooth_loss=smooth)(e, y, None, f, z), x, r)
    _check(a, b)


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(
    data=batches(with_ref=True),
    use_ref=st.booleans(),
    kind=st.sampled_from(["all", "hard", "semihard", "easy"]),
    margin=st.floats(-0.2, 0.8),
)
def test_triplet_miner_and_fused_loss_property(name, data, use_ref, kind, margin):
    x, y, r, z = data
    r, z = (r, z) if use_ref else (None, None)
    with _use(name):
        got = M.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x, y, r, z)
        assert same_indices(got, pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x, y, r, z))

        def ours(e, f):
            idx = M.TripletMarginMiner(margin=margin, type_of_triplets=kind)(e, y, f, z)
            return L.TripletMarginLoss(margin=0.1)(e, y, idx, f, z)

        a = _run(ours, x, r)

    def theirs(e, f):
        idx = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(e, y, f, z)
        return pml_losses.TripletMarginLoss(margin=0.1)(e, y, idx, f, z)

    _check(a, _run(theirs, x, r))


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(
    data=batches(),
    strategies=st.sampled_from(
        [
            ("hard", "hard"),
            ("easy", "semihard"),
            ("semihard", "hard"),
            ("easy", "easy"),
            ("all", "hard"),
            ("hard", "all"),
        ]
    ),
)
def test_batch_easy_hard_and_pair_margin_property(name, data, strategies):
    x, y, _, _ = data
    assume(x.shape[0] > 0)  # PML's BatchEasyHardMiner raises on an empty batch (fastdml returns empty tuples)
    ps, ns = strategies
    with _use(name):
        got = M.BatchEasyHardMiner(pos_strategy=ps, neg_strategy=ns)(x, y)
        got_pm = M.PairMarginMiner()(x, y)
    assert same_indices(got, pml_miners.BatchEasyHardMiner(pos_strategy=ps, neg_strategy=ns)(x, y))
    assert same_indices(got_pm, pml_miners.PairMarginMiner()(x, y))


@st.composite
def pk_batches(draw):
    """Batches where every anchor has a positive and a negative (P classes x K >= 2 samples)."""
    p = draw(st.integers(2, 4))
    k = draw(st.integers(2, 4))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p * k, d, generator=g, dtype=torch.float64)
    y = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    return x, y


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(data=pk_batches(), margin=st.floats(0.05, 1.5), soft=st.booleans())
def test_one_pass_losses_match_tf_addons_property(name, data, margin, soft):
    from tests.test_api_onepass import tfa_triplet_hard_loss, tfa_triplet_semihard_loss

    x, y = data
    with _use(name):
        a = _run(lambda e, f: L.BatchHardTripletLoss(margin=margin, soft=soft)(e, y), x, None)
        b = _run(lambda e, f: L.SemiHardTripletLoss(margin=margin)(e, y), x, None)
    _check(a, _run(lambda e, f: tfa_triplet_hard_loss(y, e, margin=margin, soft=soft), x, None))
    _check(b, _run(lambda e, f: tfa_triplet_semihard_loss(y, e, margin=margin), x, None))


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(data=batches(with_ref=True), use_ref=st.booleans(), pm=st.floats(0.0, 1.0), nm=st.floats(0.2, 1.9))
def test_pair_margin_miner_plus_contrastive_property(name, data, use_ref, pm, nm):
    x, y, r, z = data
    r, z = (r, z) if use_ref else (None, None)
    with _use(name):

        def ours(e, f):
            return L.ContrastiveLoss(pos_margin=0.1)(e, y, M.PairMarginMiner(pm, nm)(e, y, f, z), f, z)

        a = _run(ours, x, r)

    def theirs(e, f):
        return pml_losses.ContrastiveLoss(pos_margin=0.1)(e, y, pml_miners.PairMarginMiner(pm, nm)(e, y, f, z), f, z)

    _check(a, _run(theirs, x, r))

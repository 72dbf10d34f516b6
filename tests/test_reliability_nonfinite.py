"""Non-finite and extreme embeddings follow PML's rule on every backend (property-based, hypothesis).

Embeddings with NaN or +-inf rows or entries, huge (1e30) and tiny (1e-30) magnitudes, exact duplicates and
fp32 near duplicates (1e-7 apart), drawn across losses, miners, reducers and distances. On the blocked,
Triton (interpreter, tiny N) and reference backends: the loss is NaN (inf) exactly where PML's is, a miner
lists what PML lists wherever a distance is NaN, and where PML is finite the values and gradients agree.
Selections at fp32 near-ties may legitimately differ from PML's (docs/coming-from-pml.md, "Non-finite
input"), so value and gradient comparisons are made only on float64 inputs, where the picks are exact.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdml import distances, losses, miners, reducers
from fastdml.dispatch import use_backend

from .conftest import triton_on_cpu

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
DAMAGE = ["nan_row", "inf_row", "neg_inf_entry", "nan_entry", "all_nan", "huge", "tiny", "duplicates", "near_dup"]


def _embeddings(n, d, damage, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    row = seed % n
    if damage == "nan_row":
        x[row] = math.nan
    elif damage == "inf_row":
        x[row] = math.inf
    elif damage == "neg_inf_entry":
        x[row, 0] = -math.inf
    elif damage == "nan_entry":
        x[row, d - 1] = math.nan
    elif damage == "all_nan":
        x[:] = math.nan
    elif damage == "huge":  # squared distances overflow the dtype (PML: inf or NaN, by torch.cdist's form)
        x = x * (1e30 if dtype == torch.float32 else 1e160)
    elif damage == "tiny":
        x = x * 1e-30
    elif damage == "duplicates":
        x[n // 2 :] = x[: n - n // 2]
    elif damage == "near_dup":
        x[1::2] = x[0::2][: n // 2] + 1e-7
    return x.to(dtype)


def _dist(name, pml):
    mod = pml_distances if pml else distances
    return {
        "lp": lambda: mod.LpDistance(),
        "lp_raw_sq": lambda: mod.LpDistance(normalize_embeddings=False, power=2),
        "cosine": lambda: mod.CosineSimilarity(),
        "dot": lambda: mod.DotProductSimilarity(),
    }[name]()


def _reducer(name, pml):
    mod = pml_reducers if pml else reducers
    return {
        "default": lambda: None,
        "mean": lambda: mod.MeanReducer(),
        "threshold": lambda: mod.ThresholdReducer(low=0.05, high=1.5),
        "avg_nonzero": lambda: mod.AvgNonZeroReducer(),
    }[name]()


# (loss, miner) builders over PML's modules or fastdml's
CASES = {
    "contrastive": lambda L, M, d, r: (L.ContrastiveLoss(distance=d, **r), None),
    "contrastive+pairmargin": lambda L, M, d, r: (L.ContrastiveLoss(distance=d, **r), M.PairMarginMiner(distance=d)),
    "triplet": lambda L, M, d, r: (L.TripletMarginLoss(distance=d, **r), None),
    "triplet+all": lambda L, M, d, r: (L.TripletMarginLoss(distance=d, **r), M.TripletMarginMiner(distance=d)),
    "triplet+hard": lambda L, M, d, r: (
        L.TripletMarginLoss(distance=d, **r),
        M.TripletMarginMiner(distance=d, type_of_triplets="hard"),
    ),
    "triplet+semihard": lambda L, M, d, r: (
        L.TripletMarginLoss(distance=d, **r),
        M.TripletMarginMiner(distance=d, type_of_triplets="semihard"),
    ),
    "triplet+easy": lambda L, M, d, r: (
        L.TripletMarginLoss(distance=d, **r),
        M.TripletMarginMiner(distance=d, type_of_triplets="easy"),
    ),
    "triplet+batchhard": lambda L, M, d, r: (L.TripletMarginLoss(distance=d, **r), M.BatchHardMiner(distance=d)),
    "triplet+easyhard": lambda L, M, d, r: (L.TripletMarginLoss(distance=d, **r), M.BatchEasyHardMiner(distance=d)),
}


def _run(case, dist, red, x, y, pml, backend=None):
    L, M = (pml_losses, pml_miners) if pml else (losses, miners)
    r = _reducer(red, pml)
    loss_fn, miner = CASES[case](L, M, _dist(dist, pml), {} if r is None else {"reducer": r})
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pml:
            idx = None if miner is None else miner(x, y)
            loss = loss_fn(x, y, idx)
        else:
            with use_backend(backend):
                idx = None if miner is None else miner(x, y)
                loss = loss_fn(x, y, idx)  # fused with the lazy miner result where it can be
                listed = None if idx is None else tuple(t.clone() for t in idx)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    g = torch.zeros_like(x) if g is None else g
    return loss.detach(), g, (tuple(idx) if pml and idx is not None else (None if pml else listed))


def _same_nan_pattern(a, b):
    return bool(torch.isnan(a) == torch.isnan(b)) and bool(torch.isinf(a) == torch.isinf(b))


def _check(case, dist, red, damage, seed, backends, dtype):
    n = 12
    x = _embeddings(n, 5, damage, seed, dtype)
    y = torch.arange(n) % 3
    want, gwant, iwant = _run(case, dist, red, x, y, pml=True)
    for backend in backends:
        got, ggot, igot = _run(case, dist, red, x, y, pml=False, backend=backend)
        where = f"{backend}: {case} {dist} {red} {damage} seed={seed}: fastdml {float(got)} PML {float(want)}"
        assert _same_nan_pattern(got, want.to(got.dtype)), where
        # lists must match PML's where a distance is NaN; at a tie of infinite distances PML's index is the
        # row's first infinite entry, a masked one included (documented), so rows of +-inf are left out
        nan_input = bool(torch.isnan(x).any()) and not bool(torch.isinf(x).any())
        if iwant is not None and (nan_input or (dtype == torch.float64 and damage not in ("inf_row", "neg_inf_entry"))):
            assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(igot, iwant)), where + " (mined tuples differ)"
        if dtype == torch.float64 and bool(torch.isfinite(want)):
            torch.testing.assert_close(got, want.to(got.dtype), atol=1e-9, rtol=1e-7, msg=where)
            fin = torch.isfinite(gwant)
            assert torch.equal(fin, torch.isfinite(ggot)), where + " (gradient NaN pattern)"
            torch.testing.assert_close(ggot[fin], gwant[fin].to(ggot.dtype), atol=1e-9, rtol=1e-7, msg=where)


@SETTINGS
@given(
    case=st.sampled_from(sorted(CASES)),
    dist=st.sampled_from(["lp", "lp_raw_sq", "cosine", "dot"]),
    red=st.sampled_from(["default", "mean", "threshold", "avg_nonzero"]),
    damage=st.sampled_from(DAMAGE),
    seed=st.integers(0, 2**16),
)
def test_blocked_and_reference_follow_pml_on_hostile_embeddings(case, dist, red, damage, seed):
    _check(case, dist, red, damage, seed, ["blocked", "reference"], torch.float64)


@SETTINGS
@given(
    case=st.sampled_from(sorted(CASES)),
    dist=st.sampled_from(["lp", "lp_raw_sq", "cosine"]),
    damage=st.sampled_from(["nan_row", "inf_row", "nan_entry", "all_nan", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_float32_nan_pattern_and_lists_follow_pml(case, dist, damage, seed):
    _check(case, dist, "default", damage, seed, ["blocked", "reference"], torch.float32)


@triton_on_cpu
@SETTINGS
@given(
    case=st.sampled_from(sorted(CASES)),
    damage=st.sampled_from(["nan_row", "inf_row", "nan_entry", "all_nan", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_triton_nan_pattern_and_lists_follow_pml(case, damage, seed):
    _check(case, "lp", "default", damage, seed, ["triton"], torch.float32)


@pytest.mark.parametrize("backend", ["blocked", "reference", "triton"])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard"])
def test_triplet_margin_miner_with_a_nan_row_gives_pmls_loss_not_a_type_error(backend, kind):
    if backend == "triton":
        pytest.importorskip("triton")
    x = _embeddings(32, 6, "nan_row", 3, torch.float32)
    y = torch.arange(32) % 4
    with use_backend(backend):
        got = losses.TripletMarginLoss()(x, y, miners.TripletMarginMiner(type_of_triplets=kind)(x, y))
    want = pml_losses.TripletMarginLoss()(x, y, pml_miners.TripletMarginMiner(type_of_triplets=kind)(x, y))
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", ["blocked", "reference", "triton"])
@pytest.mark.parametrize("case", ["batch_hard_nan_row", "all_nan_contrastive", "all_nan_triplet"])
def test_a_diverged_model_does_not_look_converged(backend, case):
    x = _embeddings(16, 4, "all_nan" if case.startswith("all_nan") else "nan_row", 5, torch.float32)
    y = torch.arange(16) % 4
    with use_backend(backend):
        if case == "batch_hard_nan_row":
            got = losses.TripletMarginLoss()(x, y, miners.BatchHardMiner()(x, y))
        elif case == "all_nan_contrastive":
            got = losses.ContrastiveLoss()(x, y)
        else:
            got = losses.TripletMarginLoss()(x, y)
    assert torch.isnan(got), float(got)


FASTDML_ONLY = {
    "batch_hard": lambda: losses.BatchHardTripletLoss(),
    "batch_hard_soft": lambda: losses.BatchHardTripletLoss(soft=True),
    "batch_all": lambda: losses.BatchAllTripletLoss(),
    "semihard": lambda: losses.SemiHardTripletLoss(),
}


@pytest.mark.parametrize("damage", ["nan_row", "inf_row", "nan_entry", "all_nan", "huge"])
@pytest.mark.parametrize("name", sorted(FASTDML_ONLY))
def test_fastdml_only_losses_agree_across_backends_on_hostile_embeddings(name, damage):
    """Losses without a PML class: the blocked, Triton and reference backends give the same value (NaN-ness
    included) and the same gradient NaN pattern."""
    pytest.importorskip("triton")
    x0 = _embeddings(32, 6, damage, 7, torch.float32)
    y = torch.arange(32) % 4
    out = {}
    for backend in ["blocked", "triton", "reference"]:
        x = x0.clone().requires_grad_(True)
        with use_backend(backend):
            loss = FASTDML_ONLY[name]()(x, y)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
        out[backend] = (loss.detach(), torch.zeros_like(x) if g is None else g)
    want, gwant = out["reference"]
    for backend in ["blocked", "triton"]:
        got, ggot = out[backend]
        torch.testing.assert_close(got, want, equal_nan=True, msg=f"{backend} {name} {damage}")
        assert torch.equal(torch.isnan(ggot), torch.isnan(gwant)), f"{backend} {name} {damage} gradient NaN pattern"


COMPILED = {
    "triplet+all": lambda y: lambda t: losses.TripletMarginLoss()(t, y, miners.TripletMarginMiner()(t, y)),
    "triplet+hard": lambda y: (
        lambda t: losses.TripletMarginLoss()(t, y, miners.TripletMarginMiner(type_of_triplets="hard")(t, y))
    ),
    "triplet+semihard": lambda y: (
        lambda t: losses.TripletMarginLoss()(t, y, miners.TripletMarginMiner(type_of_triplets="semihard")(t, y))
    ),
    "triplet+batchhard": lambda y: lambda t: losses.TripletMarginLoss()(t, y, miners.BatchHardMiner()(t, y)),
    "batch_hard": lambda y: lambda t: losses.BatchHardTripletLoss()(t, y),
    "contrastive": lambda y: lambda t: losses.ContrastiveLoss()(t, y),
}


@pytest.mark.parametrize(
    "name, damage",
    [("triplet+all", "nan_row"), ("triplet+semihard", "nan_row"), ("triplet+batchhard", "nan_row"),
     ("batch_hard", "all_nan"), ("contrastive", "all_nan")],
)  # fmt: skip
def test_compiled_losses_follow_the_same_rule(name, damage):
    """Under torch.compile (no data-dependent routing before the ops) the blocked ops hand extreme input to the
    reference, and PML's zero loss stays NaN (the compiler would fold ``x * 0`` to 0)."""
    x = _embeddings(32, 6, damage, 3, torch.float32)
    y = torch.arange(32) % 4
    fn = COMPILED[name](y)
    want = fn(x.clone().requires_grad_(True))
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x.clone().requires_grad_(True))
    torch.testing.assert_close(got, want, equal_nan=True)


def _near_duplicates(n=24, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(n // 2, d, generator=g, dtype=torch.float64), dim=1)
    x = torch.cat([base, base + 1e-7 * torch.randn(n // 2, d, generator=g, dtype=torch.float64)])
    return x, torch.arange(n) % 3


@pytest.mark.parametrize("backend", ["blocked", "reference", "triton"])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_fp32_near_duplicates_differ_from_float64_only_within_the_error_bound(backend, kind):
    """fp32 near duplicates (1e-7 apart): a triplet may be listed or not only where its float64 margin
    t = d_an - d_ap lies within the fp32 error bound of a band edge (the docs' promise for selections)."""
    if backend == "triton":
        pytest.importorskip("triton")
    x64, y = _near_duplicates()
    margin = 0.2
    with use_backend(backend):
        got = miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x64.float(), y)
    got = set(zip(*(t.tolist() for t in got)))
    want = set(zip(*(t.tolist() for t in miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)(x64, y))))
    xn = torch.nn.functional.normalize(x64, dim=1)
    dist = torch.cdist(xn, xn)
    d = x64.shape[1]
    # fp32: |a - b|^2 to within ~4 D ulp of |a|^2 + |b|^2 = 2; d = sqrt of it (an absolute error in d^2 of e
    # moves d by at most sqrt(e) near 0)
    err = 2 * math.sqrt(4 * d * 2.0**-23 * 2)
    edges = {"all": [margin], "hard": [0.0], "semihard": [0.0, margin], "easy": [margin]}[kind]
    for a, p, n in got ^ want:
        t = float(dist[a, n] - dist[a, p])
        assert min(abs(t - e) for e in edges) <= err, (a, p, n, t, (a, p, n) in got)
    assert len(got ^ want) < max(len(want), 1)  # differences stay at the edges, not everywhere

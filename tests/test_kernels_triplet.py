"""fastdml.kernels.triplet_stats_fwd / semihard_stats_fwd against fastdml.reference: values and gradients."""

import pytest
import torch
from fastdml.kernels import _common, _staged, semihard_stats_fwd, triplet_stats_fwd

from fastdml import reference as ref
from tests.kernel_cases import (
    DEVICE,
    INF,
    as_ref,
    assert_close_scaled,
    cuda_only,
    grid,
    make_inputs,
    near_duplicates,
    needs_kernels,
    ref_call,
    safe_quantile,
)

pytestmark = needs_kernels

SCENARIOS = [
    (45, 0, 1, "few", "square"),
    (40, 31, 64, "imbalanced", "excl"),
    (38, 0, 130, "pk", "square"),
    (33, 0, 2, "one", "square"),
    (35, 29, 3, "distinct", "excl"),
]


def _staged_dprime(x, y, r, z, excl, kind):
    """The fp32 d' matrix (N, M) exactly as the triplet kernels read it: the staging kernel's output."""
    p = _common.prepare(x, y, r, z, excl, kind)
    st = _staged.Stager(p, False, _common.precision())
    rows = [st.buf[:ch, : p.m].clone() for _, ch in st.chunks()]
    return torch.cat(rows).cpu().double() if rows else torch.zeros(0, p.m, dtype=torch.float64)


def semihard_on_own_picks(x, y, r, z, excl, kind, margin):
    """The reference's semi-hard statistics evaluated on the kernel's own n* choices (rounding-proof).

    n* is chosen by ``reference.semihard_select_from_matrix`` on the fp32 d' the kernel staged (so a choice
    between negatives within fp32 rounding of each other is the kernel's); S and C then come from the float64
    d' on those picks. The staged d' itself is checked against float64 first. Returns (want, x64, r64).
    """
    x64, r64 = as_ref(x, True), as_ref(r, True)
    dmat, pos, neg = ref._setup(x64, as_ref(y), r64, as_ref(z), as_ref(excl), kind)
    d32 = _staged_dprime(x, y, r, z, excl, kind)
    # fp32 d' within the expansion's rounding of float64 (inputs of norm ~sqrt(D), so |d'| <= ~2 D)
    assert_close_scaled(d32, dmat.detach(), dict(atol=1e-5, rtol=1e-4), "staged d'")
    ai, pi, nstar = ref.semihard_select_from_matrix(d32, pos, neg)
    v = dmat[ai, pi] - dmat[ai, nstar] + margin
    want = torch.stack([torch.relu(v).sum(), torch.tensor(float(ai.numel()), dtype=torch.float64)])
    return want, x64, r64


def _check(fn, ref_name, x, y, r, z, excl, kind, args, tol, dtype, nograd=False):
    """``fn``'s stats and gradients (random upstream gradient) against ``reference.<ref_name>``, or against
    ``ref_name(x, y, r, z, excl, kind, *args)`` -> (want, x64, r64) when it is a callable."""
    u = float(torch.randn(()))
    stats, gx, gr = fn(x, y, r, z, excl, kind, *args, True)
    if callable(ref_name):
        want, x64, r64 = ref_name(x, y, r, z, excl, kind, *args)
    else:
        want, x64, r64 = ref_call(ref_name, x, y, r, z, excl, kind, *args, grad=True)
    assert stats.dtype == torch.float64 and stats.shape == (2,)
    assert_close_scaled(stats, want.detach(), tol[dtype], "stats")
    leaves = [x64] if r is None else [x64, r64]
    if want[0].requires_grad:
        grads = torch.autograd.grad(u * want[0], leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    n, d = x.shape
    assert gx.shape == (1, n, d) and gx.dtype == torch.float32
    assert_close_scaled(u * gx[0].cpu().double(), grads[0], tol[dtype], "gx")
    if r is None:
        assert gr.shape == (0, 0, d)
    else:
        assert gr.shape == (1, r.shape[0], d)
        assert_close_scaled(u * gr[0].cpu().double(), grads[1], tol[dtype], "gr")
    if nograd:
        nog = fn(x, y, r, z, excl, kind, *args, False)
        assert nog[1].shape == (0, n, d) and nog[2].shape == ((0, 0, d) if r is None else (0, r.shape[0], d))
        assert_close_scaled(nog[0], want.detach(), tol[dtype], "stats without grad")


def _triplet_args(x, r, kind, variant):
    """(margin, smooth, band_lo, band_hi, low, high) from the actual d' scale."""
    dm = ref.signed_distance_matrix(as_ref(x), as_ref(r), kind)
    spread = safe_quantile(dm, 0.7) - safe_quantile(dm, 0.3)
    margin = 0.5 * spread
    if variant == "plain":  # TripletMarginLoss + AvgNonZero window
        return margin, False, -INF, INF, 0.0, INF
    if variant == "smooth":
        return margin, True, -INF, INF, -INF, INF
    # semi-hard band (0, margin] and a threshold window on the terms
    return margin, False, 0.0, margin, 0.1 * margin, 0.9 * margin + 0.37 * spread


@pytest.mark.parametrize(("scenario", "kind", "dtype"), grid(SCENARIOS))
def test_triplet_stats_and_gradient_match_reference(scenario, kind, dtype, tol):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n + d)
    variant = ("plain", "smooth", "band")[(n + d) % 3]
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, kind, _triplet_args(x, r, kind, variant), tol, dtype)


@pytest.mark.parametrize(("scenario", "kind", "dtype"), grid(SCENARIOS))
def test_semihard_stats_and_gradient_match_reference(scenario, kind, dtype, tol):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n * d)
    margin = _triplet_args(x, r, kind, "plain")[0]
    _check(semihard_stats_fwd, semihard_on_own_picks, x, y, r, z, excl, kind, (margin,), tol, dtype)


@pytest.mark.parametrize("case", ["square", "excl"])
def test_triplet_ops_with_a_class_larger_than_a_positive_tile(case, tol):
    # class 0 holds ~60% of 70 rows: the positive loop runs over several tiles; also checks need_grad=False
    x, y, r, z, excl = make_inputs(70, 50, 2, "imbalanced", case, torch.float32, seed=11)
    args = _triplet_args(x, r, "l2", "plain")
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, "l2", args, tol, torch.float32, nograd=True)
    _check(semihard_stats_fwd, "semihard_stats", x, y, r, z, excl, "l2", args[:1], tol, torch.float32, nograd=True)


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_triplet_ops_across_staging_chunks(kind, tol, monkeypatch):
    # a budget of a few rows forces several anchor chunks: the column-side gradient adds up across them
    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [1])
    x, y, r, z, excl = make_inputs(50, 30, 3, "few", "excl", torch.float32, seed=9)
    args = _triplet_args(x, r, kind, "plain")
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, kind, args, tol, torch.float32)
    _check(semihard_stats_fwd, "semihard_stats", x, y, r, z, excl, kind, args[:1], tol, torch.float32)
    x, y, r, z, excl = make_inputs(50, 0, 3, "few", "square", torch.float32, seed=10)
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, kind, args, tol, torch.float32)


def test_semihard_ties_resolve_to_lowest_index(tol):
    # exact duplicate references: the chosen negative's index matters for the gradient only
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 3, generator=g)
    r = base[torch.randint(0, 6, (50,), generator=g)]
    z = torch.randint(0, 3, (50,), generator=g)
    x = base[torch.randint(0, 6, (40,), generator=g)] + 0.3 * torch.randn(40, 3, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    x, y, r, z = (t.to(DEVICE) for t in (x, y, r, z))
    _check(semihard_stats_fwd, "semihard_stats", x, y, r, z, None, "l2", (0.5,), tol, torch.float32)


@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_near_duplicates_match_float64(smooth, tol):
    x, y = near_duplicates(66, 3, torch.float32)
    args = (1e-3, smooth, -INF, INF, 0.0 if not smooth else -INF, INF)
    _check(triplet_stats_fwd, "triplet_stats", x, y, None, None, None, "l2", args, tol, torch.float32)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_triplet_ops_bf16_on_cuda(kind, tol):
    x, y, r, z, excl = make_inputs(300, 0, 64, "pk", "square", torch.bfloat16)
    args = _triplet_args(x, r, kind, "plain")
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, kind, args, tol, torch.bfloat16)
    _check(semihard_stats_fwd, "semihard_stats", x, y, r, z, excl, kind, args[:1], tol, torch.bfloat16)


def _nan_filled_staging(monkeypatch):
    # the staging buffers start as NaN: an entry a kernel reads without having written it shows up
    real_init = _staged.Stager.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.buf.fill_(float("nan"))
        self.w.fill_(float("nan"))

    monkeypatch.setattr(_staged.Stager, "__init__", init)


@pytest.mark.parametrize("variant", ["plain", "smooth", "band"])
@pytest.mark.parametrize(
    ("pattern", "case", "ref_pattern"),
    [
        ("one", "square", None),
        ("distinct", "excl", None),
        ("imbalanced", "square", None),
        ("pk", "excl", None),
        ("distinct", "excl", "imbalanced"),  # most anchors' labels absent from the references
    ],
)
def test_triplet_weights_of_classes_over_one_block(pattern, case, ref_pattern, variant, tol, monkeypatch):
    # classes past MAX_ONE_BLOCK: positive blocks in turn (class 0 of "imbalanced" spans several), the
    # negatives' weights from a second loop over the blocks (plain stores into a NaN-filled W), random
    # upstream gradient; "one" square: every anchor's class takes every reference (no negative)
    monkeypatch.setattr(_staged, "MAX_ONE_BLOCK", 2)
    _nan_filled_staging(monkeypatch)
    m = 0 if case == "square" else 43
    x, y, r, z, excl = make_inputs(71, m, 5, pattern, case, torch.float32, seed=13, ref_pattern=ref_pattern)
    args = _triplet_args(x, r, "l2", variant)
    _check(triplet_stats_fwd, "triplet_stats", x, y, r, z, excl, "l2", args, tol, torch.float32)


@pytest.mark.parametrize("kind", ["l2", "dot"])
@pytest.mark.parametrize(
    ("pattern", "case", "ref_pattern", "dtype"),
    [
        ("one", "square", None, torch.float32),
        ("distinct", "excl", None, torch.float32),
        ("imbalanced", "square", None, torch.float32),
        ("imbalanced", "excl", None, torch.float16),
        ("pk", "excl", None, torch.float32),
        ("distinct", "excl", "imbalanced", torch.float32),
    ],
)
def test_semihard_weights_of_classes_over_one_block(pattern, case, ref_pattern, dtype, kind, tol, monkeypatch):
    # classes past MAX_ONE_BLOCK: each positive's n* parked in its own W slot, the negatives' weights counted
    # over every positive block and stored once, then the positives' weights; W and d' start NaN-filled
    monkeypatch.setattr(_staged, "MAX_ONE_BLOCK", 2)
    _nan_filled_staging(monkeypatch)
    m = 0 if case == "square" else 43
    seed = len(pattern) + (ref_pattern is not None)
    x, y, r, z, excl = make_inputs(71, m, 5, pattern, case, dtype, seed=seed, ref_pattern=ref_pattern)
    margin = _triplet_args(x, r, kind, "plain")[0]
    _check(semihard_stats_fwd, semihard_on_own_picks, x, y, r, z, excl, kind, (margin,), tol, dtype, nograd=True)


def test_semihard_classes_over_one_block_across_chunks_at_larger_n(tol, monkeypatch):
    # N = 161: class 0 (~60 %) spans three 32-wide positive blocks; an 11-row budget cuts the anchors into
    # 15 chunks, so the column-side gradient adds up across launches; n* ties from duplicated rows
    monkeypatch.setattr(_staged, "MAX_ONE_BLOCK", 64)
    n = 161
    x, y, _, _, _ = make_inputs(n, 0, 7, "imbalanced", "square", torch.float32, seed=21)
    x[::17] = x[1::17][: x[::17].shape[0]]  # exact duplicates: n* ties resolve to the lowest index
    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [11 * n * 8])
    assert not _staged.Stager(_common.prepare(x, y, None, None, None, "l2"), True, "ieee").one_block
    margin = _triplet_args(x, None, "l2", "plain")[0]
    _check(semihard_stats_fwd, semihard_on_own_picks, x, y, None, None, None, "l2", (margin,), tol, torch.float32)

"""row_hardest (batch-hard mining in one sweep) against fastdml.reference.row_hardest.

Every backend (blocked, with its compiled row scan and with the torch ops it replaces; Triton under the
interpreter; the custom op) must give the reference's found flags
and indices exactly (ties: the lowest index) and its values within TOL, where the reference is evaluated in
float64 on the very values the backend saw. Cases: odd N (not a multiple of the block, many blocks under a
tiny budget), D = 1, 2, 3 (direct differences) and 130 (GEMM), every label pattern, square and rectangular
with per-query exclusions (including queries whose label no reference has), near-duplicate points (the
expansion's cancellation regime) and exact duplicate rows (ties between copies).
"""

import math

import pytest
import torch

from fastdml import blocked, ops
from fastdml import reference as ref
from fastdml.config import memory_budget

from . import kernel_cases as kc
from .blocked_cases import KINDS, PATTERNS, f64, make_inputs, near_duplicates
from .conftest import TOL

INF = math.inf
DTYPES = [torch.float64, torch.float32, torch.float16]


def assert_matches_reference(got, x, y, r, z, excl, kind, tol):
    """``got`` (the 6 outputs) against the float64 reference on the same values: found and indices exact,
    values within ``tol``, value and index 0 where nothing was found."""
    want = ref.row_hardest(f64(x), y, f64(r), z, excl, kind)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for side, (gv, gi, gf), (wv, wi, wf) in (("pos", got[:3], want[:3]), ("neg", got[3:], want[3:])):
        assert gv.dtype == acc and gi.dtype == torch.int64 and gf.dtype == torch.bool, side
        gv, gi, gf = gv.cpu(), gi.cpu(), gf.cpu()
        assert torch.equal(gf, wf), f"{side}: found flags differ"
        assert torch.equal(gi, wi), f"{side}: indices differ at {torch.nonzero(gi != wi).flatten().tolist()}"
        assert not gv[~gf].any() and not gi[~gf].any(), f"{side}: value/index must be 0 where not found"
        torch.testing.assert_close(gv.double(), wv, **tol, msg=lambda m, side=side: f"{side} values: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3, 130])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_matches_reference(square, kind, pattern, d, dtype):
    x, y, r, z, excl = make_inputs(37, d, dtype, square, pattern, seed=d + 7)
    for budget_mb in (0.003, 0.05, 64.0):  # one row per block, a few rows (37 not a multiple), one block
        with memory_budget(budget_mb):
            got = blocked.row_hardest(x, y, r, z, excl, kind)
        assert_matches_reference(got, x, y, r, z, excl, kind, TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_queries_without_any_positive(kind):
    # rectangular: no reference shares a label with the queries (no positive anywhere), then only some do
    x, y, r, z, excl = make_inputs(23, 5, torch.float64, False, "random", seed=3)
    for zz in (z + 100, torch.where(z == 0, z + 100, z)):
        got = blocked.row_hardest(x, y, r, zz, excl, kind)
        assert_matches_reference(got, x, y, r, zz, excl, kind, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["l2", "sql2"])
@pytest.mark.parametrize("d", [3, 130])
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_near_duplicates_pick_as_the_reference(d, kind, dtype):
    # twins 1e-3 apart sharing a label: the farthest positive of a small class can be the twin
    x, y = near_duplicates(60, d, dtype, classes=12)
    got = blocked.row_hardest(x, y, None, None, None, kind)
    assert_matches_reference(got, x, y, None, None, None, kind, TOL[dtype])
    # tight clusters with mixed labels: the nearest negative is a near-duplicate (rows re-decided exactly)
    x, y = kc.near_duplicates(61, d, dtype, scale=1e-4, seed=d)
    with memory_budget(0.05):
        got = blocked.row_hardest(x.cpu(), y.cpu(), None, None, None, kind)
    assert_matches_reference(got, x.cpu(), y.cpu(), None, None, None, kind, TOL[dtype])


@pytest.mark.parametrize("kind", ["l2", "sql2"])
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_far_from_the_origin_is_decided_exactly(kind):
    # points 0.1 apart at distance ~30 from the origin: the expansion cancels on every pair (fp32 error ~1e-3
    # of q), so every row is near and re-decided by direct differences
    x, y, r, z, excl = make_inputs(45, 130, torch.float32, False, "random", seed=4, scale=0.01)
    x, r = x + 3.0, r + 3.0
    with memory_budget(0.05):
        got = blocked.row_hardest(x, y, r, z, excl, kind)
    assert_matches_reference(got, x, y, r, z, excl, kind, TOL[torch.float32])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_ties_between_duplicate_rows_go_to_the_lowest_index(square, kind):
    # rows drawn from 9 base points: every extreme is attained by several exact copies (with the GEMM
    # rounding each copy's column differently unless copies are made to tie). For "dot" the reference itself
    # is a float64 GEMM, which rounds copies differently too: integer coordinates make every product exact
    g = torch.Generator().manual_seed(5)
    base = torch.randn(9, 130, generator=g)
    if kind == "dot":
        base = torch.randint(-3, 4, (9, 130), generator=g).float()
    x = base[torch.randint(0, 9, (50,), generator=g)]
    y = torch.randint(0, 3, (50,), generator=g)
    r = z = excl = None
    if not square:
        r = base[torch.randint(0, 9, (70,), generator=g)] + 1.0
        z = torch.randint(0, 3, (70,), generator=g)
        excl = torch.randint(-1, 70, (50,), generator=g)
    with memory_budget(0.05):
        got = blocked.row_hardest(x, y, r, z, excl, kind)
    assert_matches_reference(got, x, y, r, z, excl, kind, TOL[torch.float32])


@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_copies_tie_even_when_the_gemm_rounds_them_apart(monkeypatch):
    # BLAS may round the distances to two copies of a reference differently (a column's position decides the
    # summation order); simulate it by skewing each later copy's GEMM column by a relative 1e-6, up or down.
    # The copies must still tie (copied from the first copy), so the lowest index wins.
    from fastdml.blocked import hardest

    real = hardest._score_block

    def skewed(P, s, e, aux, out):
        t = real(P, s, e, aux, out)
        canon = hardest.canonical_columns(P)
        if canon is not None:
            later = canon != torch.arange(P.M)
            sign = torch.where(torch.arange(P.M) % 2 == 0, 1.0, -1.0).to(t.dtype)
            t = torch.where(later, t * (1 + 1e-6 * sign), t)
        return t

    monkeypatch.setattr(hardest, "_score_block", skewed)
    g = torch.Generator().manual_seed(6)
    base = torch.randn(9, 130, generator=g)
    x = base[torch.randint(0, 9, (40,), generator=g)] + 1.0
    y = torch.randint(0, 3, (40,), generator=g)
    r = base[torch.randint(0, 9, (60,), generator=g)]
    z = torch.randint(0, 3, (60,), generator=g)
    for kind in ("l2", "sql2"):
        for rr, zz in ((None, None), (r, z)):
            got = blocked.row_hardest(x, y, rr, zz, None, kind)
            assert_matches_reference(got, x, y, rr, zz, None, kind, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "m"), [(64, None), (100, None), (150, 192), (70, 242)])
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_ties_across_column_chunks(n, m, kind, dtype):
    # small integer coordinates: every distance is exact and many tie, within and across the 64-column chunks
    # of the row minimum (M a multiple of 64, and with a tail); the lowest index must win everywhere
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 3, (n, 6), generator=g).to(dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    r = z = None
    if m is not None:
        r = torch.randint(-2, 3, (m, 6), generator=g).to(dtype)
        z = torch.randint(0, 5, (m,), generator=g)
    for budget_mb in (0.01, 64.0):
        with memory_budget(budget_mb):
            got = blocked.row_hardest(x, y, r, z, None, kind)
        assert_matches_reference(got, x, y, r, z, None, kind, TOL[dtype])


@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_small_case_by_hand():
    # anchor 0 (label 0) sees three equidistant negatives (1, 3, 5 at distance 1) and farther ones (2, 4):
    # the nearest is the first copy, 1; anchor 0 has no positive
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    x = torch.cat([base[:1], base[1:2], base[2:3], base[1:2], base[2:3], base[1:2]])
    y = torch.tensor([0, 1, 1, 1, 1, 1])
    pv, pi, pf, nv, ni, nf = blocked.row_hardest(x, y, None, None, None, "l2")
    assert not bool(pf[0]) and float(pv[0]) == 0.0 and int(pi[0]) == 0
    assert bool(nf[0]) and int(ni[0]) == 1 and float(nv[0]) == 1.0
    # anchor 1's farthest positive is at distance sqrt(2^2 + 4^2) (copies 2 and 4): the first, 2
    assert bool(pf[1]) and int(pi[1]) == 2 and abs(float(pv[1]) - math.sqrt(20.0)) < 1e-12
    assert int(ni[1]) == 0 and float(nv[1]) == 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_equals_two_row_extremes(kind):
    # the contract: one sweep gives what row_extreme gives for (pos, max) and (neg, min), fp32 bit for bit
    x, y, r, z, excl = make_inputs(90, 130, torch.float32, False, "pk", seed=9)
    got = blocked.row_hardest(x, y, r, z, excl, kind)
    pos = blocked.row_extreme(x, y, r, z, excl, kind, "pos", "max", -INF, INF, None, "")
    neg = blocked.row_extreme(x, y, r, z, excl, kind, "neg", "min", -INF, INF, None, "")
    for a, b in zip(got, pos + neg):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, **TOL[torch.float32])
        else:
            assert torch.equal(a, b)


@pytest.mark.usefixtures("native_path")
def test_blocked_row_hardest_rejects_bad_input():
    x = torch.randn(5, 3)
    y = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="kind"):
        blocked.row_hardest(x, y, None, None, None, "cosine")
    with pytest.raises(ValueError, match="labels"):
        blocked.row_hardest(x, y[:4], None, None, None, "l2")
    with pytest.raises(ValueError, match="excl"):
        blocked.row_hardest(x, y, torch.randn(4, 3), y[:4], torch.full((5,), 4), "l2")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["square", "excl"])
def test_custom_op_row_hardest_matches_reference(case, kind):
    x, y, r, z, excl = kc.make_inputs(41, 43, 7, "imbalanced", case, torch.float32, seed=4)
    x, y = x.cpu(), y.cpu()
    r, z, excl = (None if t is None else t.cpu() for t in (r, z, excl))
    from fastdml import use_backend

    with use_backend("blocked"):
        got = ops.row_hardest(x, y, r, z, excl, kind)
    assert_matches_reference(got, x, y, r, z, excl, kind, TOL[torch.float32])


def test_custom_op_row_hardest_compiles_fullgraph():
    from fastdml import use_backend

    x, y, _, _, _ = make_inputs(33, 6, torch.float32, True, "pk", seed=2)

    def pick(x, y):
        pv, pi, pf, nv, ni, nf = ops.row_hardest(x, y, None, None, None, "l2")
        return torch.where(pf & nf, pv - nv, torch.zeros_like(pv)), pi, ni

    with use_backend("blocked"):
        eager = pick(x, y)
        compiled = torch.compile(pick, fullgraph=True, backend="eager")(x, y)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Triton kernels (the interpreter on the CPU, or CUDA)
# ------------------------------------------------------------------------------------------------------
SCENARIOS = kc.ROW_SCENARIOS


@kc.needs_kernels
@pytest.mark.parametrize(("scenario", "kind", "dtype"), kc.grid(SCENARIOS))
def test_kernel_row_hardest_matches_reference(scenario, kind, dtype):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = kc.make_inputs(n, m, d, pattern, case, dtype, seed=n * d)
    _check_kernel_against_reference(x, y, r, z, excl, kind, dtype)


def _check_kernel_against_reference(x, y, r, z, excl, kind, dtype):
    from fastdml.kernels import row_hardest

    got = row_hardest(x, y, r, z, excl, kind)
    want, _, _ = kc.ref_call("row_hardest", x, y, r, z, excl, kind)
    for side, g, w in (("pos", got[:3], want[:3]), ("neg", got[3:], want[3:])):
        assert g[0].dtype == torch.float32 and g[1].dtype == torch.int64 and g[2].dtype == torch.bool
        assert torch.equal(g[2].cpu(), w[2]), f"{side}: found flags differ"
        assert torch.equal(g[1].cpu(), w[1]), f"{side}: indices differ"
        kc.assert_close_scaled(g[0], w[0], TOL[dtype], f"{side} value")


@kc.needs_kernels
@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_kernel_row_hardest_ties_resolve_to_lowest_index(kind):
    # references repeated exactly (small integers: every product exact), so extremes are attained by copies
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (9, 4), generator=g).float()
    r = base[torch.randint(0, 9, (70,), generator=g)]
    z = torch.randint(0, 3, (70,), generator=g)
    x = base[torch.randint(0, 9, (40,), generator=g)] + 1.0
    y = torch.randint(0, 3, (40,), generator=g)
    args = [t.to(kc.DEVICE) for t in (x, y, r, z)]
    _check_kernel_against_reference(*args, None, kind, torch.float32)
    _check_kernel_against_reference(args[0], args[1], None, None, None, kind, torch.float32)


@kc.needs_kernels
def test_kernel_row_hardest_near_duplicates():
    x, y = kc.near_duplicates(66, 3, torch.float32)
    _check_kernel_against_reference(x, y, None, None, None, "l2", torch.float32)

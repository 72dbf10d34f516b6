"""The blocked CPU path's stats ops against the reference: values and gradients.

Covers every kind, square and rectangular (with excl), label patterns, bands and reducer windows, odd
sizes (N not a multiple of the block: tiny memory budgets force many blocks), D = 1, 2, 3, 130,
float64 / float32 / float16 / bfloat16 inputs, and fp32 near-duplicates against float64.
"""

import pytest
import torch

from fastdml import blocked
from fastdml import reference as ref
from fastdml.config import memory_budget

from .blocked_cases import (
    CONTRASTIVE_CONFIGS,
    INF,
    KINDS,
    PATTERNS,
    TRIPLET_CONFIGS,
    check_stats,
    make_inputs,
    near_duplicates,
)
from .conftest import TOL

DTYPES = (torch.float64, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(CONTRASTIVE_CONFIGS))
def test_contrastive_stats_and_gradient_match_reference(config, kind, square, dtype):
    x, y, r, z, excl = make_inputs(37, 6, dtype, square, seed=1)
    with memory_budget(0.004):  # blocks of a few rows: 37 is not a multiple of the block
        check_stats("contrastive", x, y, r, z, excl, kind, CONTRASTIVE_CONFIGS[config])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(TRIPLET_CONFIGS))
def test_triplet_stats_and_gradient_match_reference(config, kind, square, dtype):
    x, y, r, z, excl = make_inputs(29, 5, dtype, square, seed=2)
    with memory_budget(0.004):
        check_stats("triplet", x, y, r, z, excl, kind, TRIPLET_CONFIGS[config])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
def test_semihard_stats_and_gradient_match_reference(kind, square, dtype):
    x, y, r, z, excl = make_inputs(33, 7, dtype, square, seed=3)
    with memory_budget(0.004):
        check_stats("semihard", x, y, r, z, excl, kind, (0.3,))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard"])
def test_label_patterns_match_reference(op, square, pattern):
    x, y, r, z, excl = make_inputs(24, 4, torch.float64, square, pattern, seed=4)
    args = {
        "contrastive": CONTRASTIVE_CONFIGS["avgnonzero"],
        "triplet": TRIPLET_CONFIGS["all_avgnonzero"],
        "semihard": (0.2,),
    }[op]
    check_stats(op, x, y, r, z, excl, "l2", args)


@pytest.mark.parametrize("d", [1, 2, 3, 130])
@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard"])
def test_odd_dimensions_match_reference(op, d):
    x, y, r, z, excl = make_inputs(23, d, torch.float64, False, seed=5, m=19)
    args = {
        "contrastive": CONTRASTIVE_CONFIGS["band_threshold"],
        "triplet": (1.0, False, -1.0, 1.5, 0.0, float("inf")),
        "semihard": (0.5,),
    }[op]
    with memory_budget(0.003):
        check_stats(op, x, y, r, z, excl, "l2", args)
        x2, y2, _, _, _ = make_inputs(23, d, torch.float64, True, seed=6)
        check_stats(op, x2, y2, None, None, None, "sql2", args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard"])
def test_half_inputs_accumulate_in_fp32(op, dtype):
    x, y, r, z, excl = make_inputs(31, 8, dtype, False, seed=7)
    args = {
        "contrastive": CONTRASTIVE_CONFIGS["avgnonzero"],
        "triplet": TRIPLET_CONFIGS["all_avgnonzero"],
        "semihard": (0.2,),
    }[op]
    # the reference sees the same (half-rounded) values in float64: what is left is the fp32 accumulation
    stats = check_stats(op, x, y, r, z, excl, "l2", args, tol=TOL[torch.float32])
    _, gx, _ = blocked.triplet_stats_fwd(x, y, r, z, excl, "l2", 0.2, False, -1.0, 1.0, 0.0, 9.0, True)
    assert gx.dtype == torch.float32 and stats.dtype == torch.float64


@pytest.mark.parametrize("d", [2, 3, 16, 130])
@pytest.mark.parametrize("kind", ["l2", "sql2"])
@pytest.mark.parametrize("op", ["contrastive", "triplet"])
def test_fp32_near_duplicates_match_float64(op, kind, d):
    """Pairs 1e-3 apart: the expanded |x|^2 + |r|^2 - 2 x.r would be off by ~1e-4 in L2 (and 1/d in the
    gradient); the recompute by direct differences keeps fp32 within rtol 1e-4 / atol 1e-5 of float64."""
    x, y = near_duplicates(120, d, torch.float32)
    args = {
        "contrastive": (0.0, 1.0, float("-inf"), float("inf"), 0.0, float("inf")),
        "triplet": (0.05, False, float("-inf"), float("inf"), 0.0, float("inf")),
    }[op]
    check_stats(op, x, y, None, None, None, kind, args)


@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard"])
def test_identical_points_give_finite_gradients(op):
    """Zero distances (identical embeddings, in and across classes): finite stats and gradients, the L2
    subgradient 0 at d = 0, matching the reference."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x = torch.cat([base, base, base[:3]])
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    args = {
        "contrastive": CONTRASTIVE_CONFIGS["avgnonzero"],
        "triplet": TRIPLET_CONFIGS["all_avgnonzero"],
        "semihard": (0.2,),
    }[op]
    for kind in KINDS:
        if op == "semihard" and kind == "dot":
            # copies tie exactly in the blocked path (duplicate columns are made bitwise equal) but the
            # reference's -(x @ x.T) may round two copies apart, which decides semihard's strict
            # d_in > d_ip and n* among copies. With copies sharing a label (no positive/negative tie) the
            # loss is the same, the gradient may land on another copy: compare the stats only.
            y = torch.cat([y[:6], y[:6], y[:3]])
            stats, _, _ = blocked.semihard_stats_fwd(x, y, None, None, None, kind, *args, True)
            want = ref.semihard_stats(x, y, None, None, None, kind, *args)
            torch.testing.assert_close(stats, want, **TOL[torch.float64])
            continue
        stats = check_stats(op, x, y, None, None, None, kind, args)
        assert torch.isfinite(stats).all()
        _, gx, _ = {
            "contrastive": blocked.contrastive_stats_fwd,
            "triplet": blocked.triplet_stats_fwd,
            "semihard": blocked.semihard_stats_fwd,
        }[op](x.float(), y, None, None, None, kind, *args, True)
        assert torch.isfinite(gx).all()


@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard"])
def test_without_need_grad_parts_are_empty(op):
    x, y, r, z, excl = make_inputs(12, 3, torch.float32, False, seed=9)
    fn, args = {
        "contrastive": (blocked.contrastive_stats_fwd, CONTRASTIVE_CONFIGS["avgnonzero"]),
        "triplet": (blocked.triplet_stats_fwd, TRIPLET_CONFIGS["all_avgnonzero"]),
        "semihard": (blocked.semihard_stats_fwd, (0.2,)),
    }[op]
    stats, gx, gr = fn(x, y, r, z, excl, "l2", *args, False)
    assert gx.shape == (0, 12, 3) and gr.shape == (0, r.shape[0], 3)
    stats_g, _, _ = fn(x, y, r, z, excl, "l2", *args, True)
    assert torch.equal(stats, stats_g)
    _, gx, gr = fn(x, y, None, None, None, "l2", *args, False)
    assert gx.shape == (0, 12, 3) and gr.shape == (0, 0, 3)


def test_contrastive_many_label_runs_use_the_mask_path():
    """More label runs per block than rectangles allowed: the label-mask positive branch, same result."""
    x, y, r, z, excl = make_inputs(150, 6, torch.float64, False, "pk", seed=10)  # 38 label runs
    check_stats("contrastive", x, y, r, z, excl, "l2", CONTRASTIVE_CONFIGS["band_threshold"])
    x, y, _, _, _ = make_inputs(80, 6, torch.float64, True, "distinct", seed=10)
    check_stats("contrastive", x, y, None, None, None, "l2", CONTRASTIVE_CONFIGS["mean"])


def test_empty_inputs_give_zero_stats():
    x = torch.zeros(0, 4)
    y = torch.zeros(0, dtype=torch.int64)
    stats, gx, gr = blocked.contrastive_stats_fwd(x, y, None, None, None, "l2", 0.0, 1.0, -1e9, 1e9, 0.0, 1e9, True)
    assert torch.equal(stats, torch.zeros(4, dtype=torch.float64)) and gx.shape == (2, 0, 4)
    stats, gx, _ = blocked.triplet_stats_fwd(x, y, None, None, None, "l2", 0.1, False, -1.0, 1.0, 0.0, 9.0, True)
    assert torch.equal(stats, torch.zeros(2, dtype=torch.float64)) and gx.shape == (1, 0, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", ["avgnonzero", "mean", "band_threshold"])
def test_contrastive_square_tiles_with_and_without_active_negatives_match_reference(kind, config):
    """The square case sweeps tiles on and above the diagonal; clusters far apart make some tiles have no
    active negative (that branch is skipped there; with AvgNonZero, a tile whose pairs all lie beyond the
    margin skips it on the row minima alone) while others have many: same stats and gradients."""
    g = torch.Generator().manual_seed(21)
    n, d = 173, 5
    centers = torch.randn(4, d, generator=g, dtype=torch.float64) * 40.0
    which = torch.randint(0, 4, (n,), generator=g)
    x = centers[which] + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = which * 2 + torch.randint(0, 2, (n,), generator=g)  # two labels per cluster: close negatives
    with memory_budget(0.2):  # tiles of about 70 rows: 173 is not a multiple
        check_stats("contrastive", x.float(), y, None, None, None, kind, CONTRASTIVE_CONFIGS[config])
        check_stats("contrastive", x, y, None, None, None, kind, CONTRASTIVE_CONFIGS[config])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_pairs_exactly_at_the_margins_decide_as_the_reference(dtype):
    """Integer-lattice points have exact distances 1, 2, sqrt(2), ...: pairs exactly at pos/neg margins
    (and at the band edges) are decided as in the reference, where l2 masks are taken on q = d^2."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (60, 3), generator=g).to(dtype)
    y = torch.randint(0, 3, (60,), generator=g)
    for args in [(1.0, 2.0, -INF, INF, 0.0, INF), (0.0, 2.0, 1.0, 2.0, -INF, INF), (1.0, 3.0, 1.0, 2.0, 0.0, 1.0)]:
        with memory_budget(0.05):
            check_stats("contrastive", x, y, None, None, None, "l2", args)


def test_contrastive_without_reference_gradient_skips_the_column_side():
    """need_grad_r=False: no gradient parts for r (shape (0, M, D)), the same stats and dS/dx."""
    x, y, r, z, excl = make_inputs(40, 7, torch.float64, False, "random", seed=3)
    args = CONTRASTIVE_CONFIGS["avgnonzero"]
    with memory_budget(0.01):
        s1, gx1, gr1 = blocked.contrastive_stats_fwd(x, y, r, z, excl, "l2", *args, True)
        s2, gx2, gr2 = blocked.contrastive_stats_fwd(x, y, r, z, excl, "l2", *args, True, need_grad_r=False)
    assert gr1.shape == (2,) + tuple(r.shape) and gr2.shape == (0,) + tuple(r.shape)
    # (the blocks differ: without the r parts more rows fit the budget, so sums are added in another order)
    torch.testing.assert_close(s2, s1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx2, gx1, rtol=1e-12, atol=1e-12)


def test_contrastive_tiles_stay_cache_sized_when_the_parts_exceed_the_budget():
    """The O(N D) gradient parts are planned beside the tiles: parts larger than the budget (here 2 x 4 MB
    against 1 MB) must not shrink the square sweep to 1 x 1 tiles (N^2 / 2 Python-level steps)."""
    from fastdml.blocked import contrastive as bc
    from fastdml.blocked.distance import Problem

    x = torch.zeros(4096, 128)
    P = Problem(x, torch.zeros(4096, dtype=torch.long), None, None, None, "l2", "test")
    fixed = 2 * 2 * x.numel() * 4
    with memory_budget(1.0):
        side = bc._tile_side(P, fixed)
    assert side * side * bc._bytes_per_entry(P, True) <= 2**20
    assert side >= 128


@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "config",
    [(0.2, False, 0.05, 0.6, 0.1, 0.5), (0.2, False, -0.3, 0.4, 0.05, 0.3)],
    ids=["band_and_window", "wide_band_narrow_window"],
)
def test_triplet_stats_with_every_bound_searched_match_reference(config, kind, square, monkeypatch):
    """``binding`` keeps only the tightest lower and upper bounds; with all of them kept, the rank ranges must
    combine the lower bounds by their minimum and the upper ones by their maximum and give the same stats."""
    from fastdml.blocked import triplet

    monkeypatch.setattr(triplet, "binding", lambda specs, margin, upper, scale: list(specs))
    x, y, r, z, excl = make_inputs(29, 5, torch.float64, square, seed=2)
    with memory_budget(0.004):
        check_stats("triplet", x, y, r, z, excl, kind, config)

"""The square contrastive sweep with the compiled tile (fastdml/blocked/contrastive.py ``_square_native``,
csrc/contrastive_tile.c) against the float64 reference and against the torch sweep it replaces.

Every test here makes sure the compiled sweep ran (the torch sweep is replaced by a function that fails), so
a build that silently falls back cannot pass for it.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdml import blocked
from fastdml.blocked import contrastive as bc
from fastdml.blocked import native
from fastdml.config import memory_budget

from .blocked_cases import CONTRASTIVE_CONFIGS, KINDS, PATTERNS, check_stats, make_inputs, near_duplicates

INF = math.inf

pytestmark = pytest.mark.skipif(not native.enabled(), reason=f"compiled helpers: {native.status()}")


@pytest.fixture
def compiled_only(monkeypatch):
    """The torch sweeps fail if reached, and the compiled tile must have run."""

    def fail(*args, **kwargs):
        raise AssertionError("a torch sweep ran instead of the compiled tile")

    monkeypatch.setattr(bc, "_square_tiles", fail)
    monkeypatch.setattr(bc, "_block", fail)
    calls = []
    tiles = native.contrastive_tiles
    monkeypatch.setattr(native, "contrastive_tiles", lambda *a: calls.append(1) or tiles(*a))
    yield
    assert calls, "the compiled tile never ran"


def _fwd(x, y, kind, args, need_grad=True):
    return blocked.contrastive_stats_fwd(x, y, None, None, None, kind, *args, need_grad)


def _side(n_tile: int, dtype) -> float:
    """A memory budget (MB) whose compiled tiles have side ``n_tile`` (three (side, side) buffers)."""
    esize = 8 if dtype == torch.float64 else 4
    return (3 * esize * n_tile * n_tile + 1) / 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", list(CONTRASTIVE_CONFIGS))
@pytest.mark.parametrize("n", [31, 32, 33, 65, 97])
def test_tiles_match_reference_around_the_tile_side(compiled_only, n, config, kind, dtype):
    """Tiles of side 32: sizes one below, at and above it and several tiles with a ragged edge; values and
    gradients (random upstream gradient) against the float64 reference. Scale 0.3 puts many negatives
    inside the margins (the negative GEMMs run), scale 1 few."""
    for scale in (0.3, 1.0):
        x, y, *_ = make_inputs(n, 7, dtype, True, "random", seed=n, scale=scale)
        with memory_budget(_side(32, dtype)):
            check_stats("contrastive", x, y, None, None, None, kind, CONTRASTIVE_CONFIGS[config])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_label_patterns_match_reference(compiled_only, pattern, kind):
    """One class (a single run longer than a tile), all distinct and PK (only short runs: direct
    differences), imbalanced (one long run, a few short ones)."""
    x, y, *_ = make_inputs(150, 6, torch.float64, True, pattern, seed=3, scale=0.4)
    for mb in (_side(40, torch.float64), 64.0):
        with memory_budget(mb):
            for config in CONTRASTIVE_CONFIGS.values():
                check_stats("contrastive", x, y, None, None, None, kind, config)


@pytest.mark.parametrize("direct_run", [0, 10**9])
@pytest.mark.parametrize("kind", KINDS)
def test_direct_differences_and_gemms_agree(compiled_only, monkeypatch, direct_run, kind):
    """Every label run's positives by GEMMs (``DIRECT_RUN = 0``) or all by direct differences: the same
    stats and gradients as the reference."""
    monkeypatch.setattr(bc, "DIRECT_RUN", direct_run)
    x, y, *_ = make_inputs(120, 9, torch.float64, True, "imbalanced", seed=4, scale=0.3)
    with memory_budget(_side(48, torch.float64)):
        for config in CONTRASTIVE_CONFIGS.values():
            check_stats("contrastive", x, y, None, None, None, kind, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_and_torch_sweeps_agree(monkeypatch, dtype, kind):
    """The compiled sweep against the torch sweep (``native.disabled()``) on the same inputs: stats and
    gradient parts; without gradient parts the stats are bitwise those with them."""
    calls = []
    tiles = native.contrastive_tiles
    monkeypatch.setattr(native, "contrastive_tiles", lambda *a: calls.append(1) or tiles(*a))
    x, y, *_ = make_inputs(200, 16, dtype, True, "random", seed=8, scale=0.35)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for config in CONTRASTIVE_CONFIGS.values():
        with memory_budget(_side(64, dtype)):
            s1, g1, _ = _fwd(x, y, kind, config)
            s0, g0, _ = _fwd(x, y, kind, config, need_grad=False)
            n = len(calls)
            with native.disabled():
                s2, g2, _ = _fwd(x, y, kind, config)
            assert len(calls) == n == 2  # (the torch sweep ran without the compiled tile)
            calls.clear()
        assert torch.equal(s0, s1) and g0.shape == (0, 200, 16)
        torch.testing.assert_close(s1, s2, **tol)
        torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_runs_are_bitwise_deterministic(compiled_only, kind):
    x, y, *_ = make_inputs(150, 12, torch.float32, True, "imbalanced", seed=9, scale=0.3)
    with memory_budget(_side(40, torch.float32)):
        for config in CONTRASTIVE_CONFIGS.values():
            a = _fwd(x, y, kind, config)
            b = _fwd(x, y, kind, config)
            assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["l2", "sql2"])
def test_near_duplicates_match_reference(compiled_only, dtype, kind):
    """Pairs 1e-3 apart: recomputed by direct differences in the tile (l2: their gradient too), positives
    and, with a second label per pair, negatives; float32 within its tolerance of the float64 result."""
    x, y = near_duplicates(160, 24, dtype, scale=1e-3)
    y2 = y.clone()
    y2[: y.numel() // 2] += 7  # some near-duplicate pairs become negatives
    for labels in (y, y2):
        with memory_budget(_side(48, dtype)):
            for config in CONTRASTIVE_CONFIGS.values():
                check_stats("contrastive", x, labels, None, None, None, kind, config)


def test_identical_points_give_finite_gradients(compiled_only):
    """Rows 1e-12 to 1e-9 apart (the GEMM's q is rounding noise there): the tile recomputes them, their
    weight 1/d is left out of the GEMMs (direct differences) and the gradient stays finite and right."""
    x = torch.randn(40, 8, dtype=torch.float64)
    x[20:] = x[:20]
    x[20:, 0] += torch.linspace(1e-12, 1e-9, 20, dtype=torch.float64)  # (no exact copies: those take the rows)
    y = torch.arange(40) % 3
    stats, gx, _ = _fwd(x, y, "l2", CONTRASTIVE_CONFIGS["mean"])
    assert torch.isfinite(stats).all() and torch.isfinite(gx).all()
    check_stats("contrastive", x, y, None, None, None, "l2", CONTRASTIVE_CONFIGS["mean"])


def test_tile_plan_respects_the_budget(compiled_only):
    """The tiles fit the budget; the O(N D) gradient parts are planned beside them (as in the torch sweep)."""
    from fastdml.blocked import budget

    x, y, *_ = make_inputs(300, 8, torch.float32, True, "random", seed=5)
    parts = 2 * x.numel() * 4
    budget.peak_log = []
    try:
        for mb in (0.05, 1.0, 64.0):
            with memory_budget(mb):
                _fwd(x, y, "l2", CONTRASTIVE_CONFIGS["avgnonzero"], need_grad=False)
                assert budget.peak_log and max(budget.peak_log) <= mb * 2**20
                budget.peak_log.clear()
                _fwd(x, y, "l2", CONTRASTIVE_CONFIGS["avgnonzero"])
                assert budget.peak_log and max(budget.peak_log) - parts <= mb * 2**20
                budget.peak_log.clear()
    finally:
        budget.peak_log = None


def _tile_arguments(n=6, d=3):
    """Valid arguments of ``native.contrastive_tiles`` for n points in d dimensions, one label run."""
    x = torch.randn(n, d)
    xn = (x * x).sum(1)
    plo, phi = torch.zeros(n, dtype=torch.int64), torch.full((n,), n, dtype=torch.int64)
    pdir = torch.zeros(n, dtype=torch.uint8)
    bounds = torch.tensor([0.0, INF, 0.0, INF, -INF, 1.0, -INF, 1.0], dtype=torch.float64)
    stats = torch.zeros(4, dtype=torch.float64)
    return x, xn, plo, phi, pdir, bounds, stats


def test_tile_rejects_bad_arguments():
    """The C checks the sizes and offsets it is given; the wrapper checks dtypes and shapes."""
    n, d = 6, 3
    x, xn, plo, phi, pdir, bounds, stats = _tile_arguments(n, d)
    tile = native.contrastive_tiles(x, xn, plo, phi, pdir, "l2", bounds, 0.0, 1.0, 0.01, None, None, stats)
    v = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="out of range"):
        tile(v, 4, 0, None, None, False)  # rows 4..7 of 6
    with pytest.raises(ValueError, match="out of range"):
        tile(torch.zeros(2, 3), 0, 0, None, None, True)  # a whole diagonal tile must be square
    with pytest.raises(ValueError, match="contiguous"):
        tile(torch.zeros(4, 4).t(), 0, 0, None, None, False)
    bad = phi.clone()
    bad[1] = n + 1
    t2 = native.contrastive_tiles(x, xn, plo, bad, pdir, "l2", bounds, 0.0, 1.0, 0.01, None, None, stats)
    with pytest.raises(ValueError, match="out of range"):
        t2(v, 0, 0, None, None, False)
    with pytest.raises(ValueError, match="pdir"):
        native.contrastive_tiles(x, xn, plo, phi, pdir.long(), "l2", bounds, 0.0, 1.0, 0.01, None, None, stats)
    assert torch.equal(stats, torch.zeros(4, dtype=torch.float64))  # nothing was added by a refused call


def test_tile_names_each_bad_argument():
    """Unknown kinds, a near-duplicate test on dot products, half a gradient and shared buffers are refused
    by name; the C refuses a near-duplicate test on dot products by itself too."""
    n, d = 6, 3
    x, xn, plo, phi, pdir, bounds, stats = _tile_arguments(n, d)
    args = (x, xn, plo, phi, pdir)
    with pytest.raises(ValueError, match="kind"):
        native.contrastive_tiles(*args, "cosine", bounds, 0.0, 1.0, 0.0, None, None, stats)
    with pytest.raises(ValueError, match="near"):
        native.contrastive_tiles(*args, "dot", bounds, 0.0, 1.0, 0.01, None, None, stats)
    rs, gx = torch.zeros(2, n, dtype=torch.float64), torch.zeros(2, n, d)
    with pytest.raises(ValueError, match="rs and gx"):
        native.contrastive_tiles(*args, "l2", bounds, 0.0, 1.0, 0.01, rs, None, stats)
    tile = native.contrastive_tiles(*args, "l2", bounds, 0.0, 1.0, 0.01, rs, gx, stats)
    v, cp = torch.zeros(4, 4), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="cn is required"):
        tile(v, 0, 0, cp, None, False)
    with pytest.raises(ValueError, match="v and cp share memory|cp and v share memory"):
        tile(v, 0, 0, v, torch.zeros(4, 4), False)
    both = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="share memory"):
        tile(v, 0, 0, both[0], both.view(-1)[8:24].view(4, 4), False)
    assert torch.equal(stats, torch.zeros(4, dtype=torch.float64))
    # the C itself: kind 2 (dot) with near > 0 is a bad argument, nothing added to stats
    lib = native._library()
    code = lib.fastdml_contrastive_tile_f32(
        v.data_ptr(), 4, 4, 0, 0, n, d, x.data_ptr(), xn.data_ptr(), plo.data_ptr(), phi.data_ptr(),
        pdir.data_ptr(), 2, bounds.data_ptr(), 0.0, 1.0, 0.01, 0, 0, 0, 0, 0, 0, stats.data_ptr(),
    )  # fmt: skip
    assert code == native._BAD_ARGUMENT
    assert torch.equal(stats, torch.zeros(4, dtype=torch.float64))

"""The blocked path's dense sweep of the square contrastive case for small D (``_square_dense_direct``).

A square problem with D <= DIRECT_MAX_D whose whole (N, N) sweep fits the memory budget is taken in one
pass with direct differences, gradient included. Checked against the float64 reference (values and
gradients, random upstream gradient) over dimensions, kinds, loss configurations and label patterns, and
against the tile sweep it replaces (same selections: identical counts).
"""

from __future__ import annotations

import pytest
import torch

from fastdml import blocked
from fastdml.blocked import budget
from fastdml.blocked import contrastive as bc
from fastdml.config import memory_budget

from .blocked_cases import CONTRASTIVE_CONFIGS, PATTERNS, check_stats, make_inputs, near_duplicates


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts the dense sweeps; the tile sweeps are recorded too."""
    calls = {"dense": 0, "tiles": 0}
    dense, tiles = bc._square_dense_direct, bc._square_tiles

    def spy_dense(*args):
        calls["dense"] += 1
        return dense(*args)

    def spy_tiles(*args):
        calls["tiles"] += 1
        return tiles(*args)

    monkeypatch.setattr(bc, "_square_dense_direct", spy_dense)
    monkeypatch.setattr(bc, "_square_tiles", spy_tiles)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", list(CONTRASTIVE_CONFIGS))
@pytest.mark.parametrize("kind", ["l2", "sql2"])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_dense_sweep_matches_reference(dense_calls, d, kind, config, pattern, dtype):
    # scale 0.5: many pairs inside the margins on both branches
    x, y, _, _, _ = make_inputs(37, d, dtype, pattern=pattern, seed=d, scale=0.5)
    check_stats("contrastive", x, y, None, None, None, kind, CONTRASTIVE_CONFIGS[config])
    assert dense_calls == {"dense": 1, "tiles": 0}


def _tiles(x, y, kind, args):
    """The tile sweep on the same problem (tiles of about 20 rows), the dense pass ruled out."""
    from fastdml import dispatch

    n_max = dispatch.DENSE_SWEEP_MAX_N
    dispatch.DENSE_SWEEP_MAX_N = 0
    try:
        with memory_budget(0.01):
            return blocked.contrastive_stats_fwd(x, y, None, None, None, kind, *args, True)
    finally:
        dispatch.DENSE_SWEEP_MAX_N = n_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["l2", "sql2"])
@pytest.mark.parametrize("config", list(CONTRASTIVE_CONFIGS))
@pytest.mark.parametrize("d", [2, 3])
def test_dense_sweep_and_tile_sweep_select_the_same_pairs(dense_calls, d, config, kind, dtype):
    """Near-duplicate pairs (1e-3 apart, where the tiles take the gradient apart): the same counts exactly
    (both compare the same direct q with the same bounds), sums and gradients within rounding; both paths
    against the float64 reference."""
    x, y = near_duplicates(90, d, dtype, scale=1e-3, seed=4)
    x = x * 0.7  # pairs on both sides of the margins
    args = CONTRASTIVE_CONFIGS[config]
    dense = blocked.contrastive_stats_fwd(x, y, None, None, None, kind, *args, True)
    tiles = _tiles(x, y, kind, args)
    assert dense_calls == {"dense": 1, "tiles": 1}
    assert torch.equal(dense[0][[1, 3]], tiles[0][[1, 3]])
    # the same terms summed in another order (per-row sums of up to n terms in the accumulation dtype), and the
    # tiles' GEMM-shaped gradient rounds each of its n products once more: n eps of the largest magnitude
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(dense[0], tiles[0], rtol=90 * eps, atol=0)
    torch.testing.assert_close(dense[1], tiles[1], rtol=0, atol=90 * eps * float(tiles[1].abs().max()))
    check_stats("contrastive", x, y, None, None, None, kind, args)
    with memory_budget(0.01):
        check_stats("contrastive", x, y, None, None, None, kind, args)


def test_dense_sweep_is_taken_only_within_its_size_and_the_budget(dense_calls):
    """The dense plan (six (N, N) buffers and two masks beside the parts) must fit the budget, and N must not
    exceed DENSE_SWEEP_MAX_N; otherwise tiles. Every plan recorded stays within the budget (the peak itself
    is measured in tests/test_blocked_memory.py)."""
    from fastdml import dispatch

    n_max = dispatch.DENSE_SWEEP_MAX_N
    args = CONTRASTIVE_CONFIGS["mean"]
    x, y, _, _, _ = make_inputs(n_max + 1, 2, torch.float32, seed=1)
    budget.peak_log = []
    try:
        with memory_budget(4.0):  # 26 x 384^2 bytes = 3.7 MiB: fits
            blocked.contrastive_stats_fwd(x[:n_max], y[:n_max], None, None, None, "l2", *args, True)
            assert dense_calls == {"dense": 1, "tiles": 0}
            blocked.contrastive_stats_fwd(x, y, None, None, None, "l2", *args, True)  # one row too many
            assert dense_calls == {"dense": 1, "tiles": 1}
        assert max(budget.peak_log) <= 4 * 2**20
        budget.peak_log = []
        with memory_budget(3.0):  # does not fit: tiles
            blocked.contrastive_stats_fwd(x[:n_max], y[:n_max], None, None, None, "l2", *args, True)
        assert dense_calls == {"dense": 1, "tiles": 2}
        assert max(budget.peak_log) <= 3 * 2**20
    finally:
        budget.peak_log = None


@pytest.mark.parametrize("esize", [4, 8])
@pytest.mark.parametrize("n", [1, 97, 384])
def test_dense_sweep_rule_counts_six_buffers_and_two_masks(n, esize):
    """The rule's bytes, (6 esize + 2) n^2 beside the parts, decide at the exact budget boundary."""
    from fastdml import dispatch

    fixed = 2 * n * 2 * esize
    need = (6 * esize + 2) * n * n + fixed
    with memory_budget(need / 2**20):
        assert dispatch.contrastive_dense_sweep(True, n, esize, fixed)
        assert not dispatch.contrastive_dense_sweep(False, n, esize, fixed)  # not small D: tiles
    with memory_budget((need - 1) / 2**20):
        assert not dispatch.contrastive_dense_sweep(True, n, esize, fixed)


@pytest.mark.parametrize("kind", ["l2", "sql2"])
def test_dense_sweep_weight_is_zero_at_coincident_points(dense_calls, kind):
    """Rows 0 and 1 are distinct but their squared distance underflows to 0 in fp32, and they form an active
    negative pair: d = 0 there, so the pair's gradient weight is 0 as in the tiles (never 0/0 or A/0); the
    float64 reference sees d = 1e-30 and is not the oracle here."""
    x = torch.tensor([[0.0, 0.0], [1e-30, 0.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.9]])
    y = torch.tensor([0, 1, 1, 0, 1])
    args = CONTRASTIVE_CONFIGS["mean"]
    stats, gx, _ = blocked.contrastive_stats_fwd(x, y, None, None, None, kind, *args, True)
    assert torch.isfinite(stats).all() and torch.isfinite(gx).all()
    tiles = _tiles(x, y, kind, args)
    assert dense_calls == {"dense": 1, "tiles": 1}
    assert torch.equal(stats[[1, 3]], tiles[0][[1, 3]])
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(stats, tiles[0], rtol=8 * eps, atol=0)
    torch.testing.assert_close(gx, tiles[1], rtol=0, atol=8 * eps * float(tiles[1].abs().max()))

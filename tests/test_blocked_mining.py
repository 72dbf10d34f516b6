"""The blocked CPU path's miners against the reference: row_extreme, triplet_list, pair_list.

Listing miners must reproduce the reference's index lists exactly (PML's order); row_extreme its indices
exactly (ties to the lowest index) and its values within TOL. Small memory budgets force many blocks
(and, for the lists, the count / prefix-sum / write sweeps).
"""

import math

import pytest
import torch

from fastdml import blocked
from fastdml import reference as ref
from fastdml.config import memory_budget

from .blocked_cases import KINDS, PATTERNS, f64, make_inputs
from .conftest import TOL

INF = math.inf
BUDGETS = [0.003, 64.0]  # many blocks / a single block


def assert_lists_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.int64
        assert torch.equal(g, w), f"lists differ: {g.numel()} vs {w.numel()} entries"


@pytest.mark.parametrize("budget_mb", BUDGETS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("band", [(-INF, INF), (0.0, 0.3), (-INF, 0.0), (0.3, INF), (-0.5, 0.2)])
def test_triplet_list_matches_reference(band, kind, square, budget_mb):
    x, y, r, z, excl = make_inputs(31, 5, torch.float64, square, seed=11)
    with memory_budget(budget_mb):
        got = blocked.triplet_list(x, y, r, z, excl, kind, *band)
    assert_lists_equal(got, ref.triplet_list(x, y, r, z, excl, kind, *band))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_triplet_list_label_patterns(pattern):
    x, y, r, z, excl = make_inputs(26, 3, torch.float64, True, pattern, seed=12)
    with memory_budget(0.003):
        got = blocked.triplet_list(x, y, r, z, excl, "l2", 0.0, 0.5)
    assert_lists_equal(got, ref.triplet_list(x, y, r, z, excl, "l2", 0.0, 0.5))


@pytest.mark.parametrize("budget_mb", BUDGETS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bounds", [(-INF, INF), (1.5, 2.5), (-1.0, -0.5)])
def test_pair_list_matches_reference(bounds, kind, square, budget_mb):
    x, y, r, z, excl = make_inputs(33, 4, torch.float64, square, seed=13)
    with memory_budget(budget_mb):
        got = blocked.pair_list(x, y, r, z, excl, kind, *bounds)
    assert_lists_equal(got, ref.pair_list(x, y, r, z, excl, kind, *bounds))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["pos", "neg"])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_row_extreme_matches_reference(mode, side, kind, square, dtype):
    x, y, r, z, excl = make_inputs(35, 6, dtype, square, seed=14)
    g = torch.Generator().manual_seed(15)
    thr = torch.rand(35, generator=g, dtype=torch.float64) * 3
    if kind == "dot":
        thr = thr - 1.5
    cases = [(-INF, INF, None, ""), (0.5, 3.0, None, ""), (-INF, INF, thr, "gt"), (-INF, INF, thr, "lt")]
    with memory_budget(0.003):
        for lo, hi, t, op in cases:
            value, index, found = blocked.row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, t, op)
            wv, wi, wf = ref.row_extreme(f64(x), y, f64(r), z, excl, kind, side, mode, lo, hi, t, op)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert value.dtype == acc and index.dtype == torch.int64 and found.dtype == torch.bool
            assert torch.equal(found, wf)
            assert torch.equal(index, wi)
            torch.testing.assert_close(value.to(torch.float64), wv, **TOL[dtype])


def test_row_extreme_ties_go_to_the_lowest_index():
    # three copies of one point at the same distance from the anchor: the first copy wins, max and min
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    x = torch.cat([base[:1], base[1:2], base[2:3], base[1:2], base[2:3], base[1:2]])
    y = torch.tensor([0, 1, 1, 1, 1, 1])
    for kind in ("l2", "sql2"):
        value, index, found = blocked.row_extreme(x, y, None, None, None, kind, "neg", "min", -INF, INF, None, "")
        assert int(index[0]) == 1 and bool(found[0])
        value, index, found = blocked.row_extreme(x, y, None, None, None, kind, "neg", "max", -INF, INF, None, "")
        assert int(index[0]) == 2
    # anchor 1's only positive is absent (one class per label 0): found False, value/index 0
    value, index, found = blocked.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, None, "")
    assert not bool(found[0]) and float(value[0]) == 0.0 and int(index[0]) == 0


def test_triplet_list_multi_block_write_matches_single_block():
    x, y, r, z, excl = make_inputs(60, 4, torch.float32, False, "imbalanced", seed=16)
    with memory_budget(64):
        one = blocked.triplet_list(x, y, r, z, excl, "l2", -0.2, 0.4)
    with memory_budget(0.005):
        many = blocked.triplet_list(x, y, r, z, excl, "l2", -0.2, 0.4)
    assert_lists_equal(many, one)
    assert one[0].numel() > 1000

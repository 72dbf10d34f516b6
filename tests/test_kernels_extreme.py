"""fastdml.kernels.row_extreme against fastdml.reference.row_extreme: found flags, chosen indices, values."""

import pytest
import torch
from fastdml.kernels import row_extreme

from fastdml import reference as ref
from tests.kernel_cases import (
    DEVICE,
    INF,
    ROW_SCENARIOS,
    as_ref,
    assert_close_scaled,
    grid,
    make_inputs,
    near_duplicates,
    needs_kernels,
    ref_call,
    safe_quantile,
)

pytestmark = needs_kernels

SCENARIOS = ROW_SCENARIOS


def _check(x, y, r, z, excl, kind, args, tol, dtype):
    val, idx, found = row_extreme(x, y, r, z, excl, kind, *args)
    (rv, ri, rf), _, _ = ref_call("row_extreme", x, y, r, z, excl, kind, *args)
    assert val.dtype == torch.float32 and idx.dtype == torch.int64 and found.dtype == torch.bool
    assert torch.equal(found.cpu(), rf), "found flags differ"
    assert torch.equal(idx.cpu()[rf], ri[rf]), "chosen indices differ"
    assert (idx.cpu()[~rf] == 0).all() and (val.cpu()[~rf] == 0).all(), "value/index must be 0 where not found"
    assert_close_scaled(val, rv, tol[dtype], "value")


@pytest.mark.parametrize(("scenario", "kind", "dtype"), grid(SCENARIOS))
def test_row_extreme_matches_reference_for_each_side_and_mode(scenario, kind, dtype, tol):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n * d)
    dm = ref.signed_distance_matrix(as_ref(x), as_ref(r), kind)
    lo, hi = safe_quantile(dm, 0.1), safe_quantile(dm, 0.9)
    g = torch.Generator().manual_seed(1)
    # per-query thresholds between neighbouring distances (a fp32 rounding cannot flip the comparison)
    thr = torch.tensor([safe_quantile(dm[i], float(f)) for i, f in enumerate(torch.rand(n, generator=g))])
    thr = thr.to(DEVICE)
    for side in ("pos", "neg"):
        for mode in ("max", "min"):
            _check(x, y, r, z, excl, kind, (side, mode, -INF, INF, None, ""), tol, dtype)
    _check(x, y, r, z, excl, kind, ("neg", "min", -INF, INF, thr, "gt"), tol, dtype)
    _check(x, y, r, z, excl, kind, ("pos", "max", lo, hi, thr, "lt"), tol, dtype)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_row_extreme_ties_resolve_to_lowest_index(mode, tol):
    # references repeated exactly: every extreme is attained by several columns
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 4, generator=g)
    r = base[torch.randint(0, 9, (70,), generator=g)]
    z = torch.randint(0, 3, (70,), generator=g)
    x = base[torch.randint(0, 9, (40,), generator=g)] + 0.5
    y = torch.randint(0, 3, (40,), generator=g)
    args = [t.to(DEVICE) for t in (x, y, r, z)]
    for kind in ("l2", "dot"):
        for side in ("pos", "neg"):
            _check(*args[:2], *args[2:], None, kind, (side, mode, -INF, INF, None, ""), tol, torch.float32)


def test_row_extreme_near_duplicates(tol):
    x, y = near_duplicates(66, 3, torch.float32)
    for mode in ("max", "min"):
        _check(x, y, None, None, None, "l2", ("pos", mode, -INF, INF, None, ""), tol, torch.float32)

"""The Triton launchers reject bad input with errors that name the argument (before any kernel runs)."""

import pytest
import torch

from fastdml import kernels as K
from tests.kernel_cases import DEVICE, INF, needs_kernels

pytestmark = needs_kernels


def _ok():
    x = torch.randn(10, 3, device=DEVICE)
    y = torch.randint(0, 2, (10,), device=DEVICE)
    r = torch.randn(7, 3, device=DEVICE)
    z = torch.randint(0, 2, (7,), device=DEVICE)
    return x, y, r, z


CALLS = {
    "contrastive": lambda x, y, r, z, e, kind="l2": K.contrastive_stats_fwd(
        x, y, r, z, e, kind, 0.0, 1.0, -INF, INF, 0.0, INF, True
    ),
    "triplet": lambda x, y, r, z, e, kind="l2": K.triplet_stats_fwd(
        x, y, r, z, e, kind, 0.1, False, -INF, INF, 0.0, INF, True
    ),
    "semihard": lambda x, y, r, z, e, kind="l2": K.semihard_stats_fwd(x, y, r, z, e, kind, 0.1, True),
    "row_extreme": lambda x, y, r, z, e, kind="l2": K.row_extreme(
        x, y, r, z, e, kind, "pos", "max", -INF, INF, None, ""
    ),
    "pair_list": lambda x, y, r, z, e, kind="l2": K.pair_list(x, y, r, z, e, kind, -INF, INF),
    "triplet_list": lambda x, y, r, z, e, kind="l2": K.triplet_list(x, y, r, z, e, kind, -INF, INF),
}


@pytest.mark.parametrize("op", list(CALLS))
def test_launchers_name_the_bad_argument(op):
    call = CALLS[op]
    x, y, r, z = _ok()
    cases = [
        ((x[0], y, None, None, None), ValueError, "x must be 2-D"),
        ((x.double(), y, None, None, None), TypeError, "x is float64"),
        ((x.int(), y, None, None, None), TypeError, "x must be float32"),
        ((x, y[:9], None, None, None), ValueError, "y must have shape"),
        ((x, y.int(), None, None, None), TypeError, "y must be int64"),
        ((x, y, r, None, None), ValueError, "z (reference labels)"),
        ((x, y, r, z[:5], None), ValueError, "z must have shape"),
        ((x, y, r[:, :2], z, None), ValueError, "r has 2 columns"),
        ((x, y, r.half(), z, None), TypeError, "r has dtype"),
        ((x, y, r, z, y[:3]), ValueError, "excl must have shape"),
        ((x, y, None, None, y), ValueError, "excl must be None"),
        ((x, y, None, z, None), ValueError, "z must be None"),
    ]
    for args, exc, text in cases:
        with pytest.raises(exc, match=None) as info:
            call(*args)
        assert text in str(info.value), f"{op}: {info.value!r} does not say {text!r}"
    with pytest.raises(ValueError, match="kind must be one of"):
        call(x, y, None, None, None, kind="cosine")


def test_row_extreme_checks_its_own_arguments():
    x, y, _, _ = _ok()
    with pytest.raises(ValueError, match="side must be"):
        K.row_extreme(x, y, None, None, None, "l2", "both", "max", -INF, INF, None, "")
    with pytest.raises(ValueError, match="mode must be"):
        K.row_extreme(x, y, None, None, None, "l2", "pos", "median", -INF, INF, None, "")
    with pytest.raises(ValueError, match="needs a thr tensor"):
        K.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, None, "gt")
    with pytest.raises(ValueError, match="thr must be a tensor of shape"):
        K.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, torch.zeros(3, device=DEVICE), "gt")
    with pytest.raises(ValueError, match="lo must not be NaN"):
        K.row_extreme(x, y, None, None, None, "l2", "pos", "max", float("nan"), INF, None, "")


def test_empty_batches_give_zero_stats_and_empty_outputs():
    x = torch.randn(0, 3, device=DEVICE)
    y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    stats, gx, gr = CALLS["contrastive"](x, y, None, None, None)
    assert stats.tolist() == [0.0, 0.0, 0.0, 0.0] and gx.shape == (2, 0, 3)
    stats, gx, gr = CALLS["triplet"](x, y, None, None, None)
    assert stats.tolist() == [0.0, 0.0] and gx.shape == (1, 0, 3)
    stats, gx, gr = CALLS["semihard"](x, y, None, None, None)
    assert stats.tolist() == [0.0, 0.0]
    assert all(t.numel() == 0 for t in CALLS["triplet_list"](x, y, None, None, None))
    assert all(t.numel() == 0 for t in CALLS["pair_list"](x, y, None, None, None))


def test_rectangular_with_no_references_gives_zero_gradient():
    x, y, r, z = _ok()
    r0, z0 = r[:0], z[:0]
    for op in ("contrastive", "triplet", "semihard"):
        stats, gx, gr = CALLS[op](x, y, r0, z0, None)
        assert (stats == 0).all(), op
        assert gx.shape[1:] == (10, 3) and (gx == 0).all(), op
        assert gr.shape[1:] == (0, 3), op

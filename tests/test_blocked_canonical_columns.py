"""``canonical_columns``: each reference row's lowest exact copy (it makes copies tie exactly in the GEMM path).

The exact ``torch.unique`` runs only on the rows whose hash collides; proved here against the
definition (lowest index i with r_i == r_j, by direct row comparison) on memory-like inputs: many rows, few
exact copies placed far apart, integer-valued rows with many copies, and no copies at all.
"""

from __future__ import annotations

import pytest
import torch

from fastdml.blocked.distance import Problem, canonical_columns


def _lowest_copy(r: torch.Tensor) -> torch.Tensor:
    out = torch.arange(r.shape[0])
    for j in range(r.shape[0]):
        same = (r == r[j]).all(1).nonzero().flatten()
        out[j] = same.min()
    return out


def _problem(r):
    x = torch.zeros(2, r.shape[1], dtype=r.dtype)
    return Problem(x, torch.zeros(2, dtype=torch.long), r, torch.zeros(r.shape[0], dtype=torch.long), None, "l2", "t")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["far_copies", "integer_rows", "no_copies", "all_equal"])
def test_canonical_columns_is_the_lowest_exact_copy(layout, dtype):
    g = torch.Generator().manual_seed(7)
    m, d = 400, 6
    if layout == "integer_rows":
        r = torch.randint(-1, 2, (m, 2), generator=g).to(dtype)
    elif layout == "all_equal":
        r = torch.full((m, d), 0.25, dtype=dtype)
    else:
        r = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
        if layout == "far_copies":
            # a batch written again 3 ring positions later, plus a few scattered copies
            r[300:340] = r[10:50]
            r[399] = r[5]
            r[200] = r[399]
    got = canonical_columns(_problem(r))
    want = _lowest_copy(r)
    if bool((want == torch.arange(m)).all()):
        assert got is None
    else:
        assert got is not None and torch.equal(got, want)

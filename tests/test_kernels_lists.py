"""fastdml.kernels.pair_list / triplet_list against fastdml.reference: the exact lists, in PML's order."""

import pytest
import torch
from fastdml.kernels import _staged, pair_list, triplet_list

from fastdml import reference as ref
from tests.kernel_cases import INF, as_ref, grid, make_inputs, needs_kernels, ref_call, safe_quantile

pytestmark = needs_kernels

SCENARIOS = [
    (45, 0, 1, "few", "square"),
    (38, 0, 130, "pk", "square"),
    (33, 0, 2, "one", "square"),
    (40, 37, 64, "imbalanced", "rect"),
    (35, 29, 3, "distinct", "excl"),
]


def _same_lists(got, want):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.int64, f"list {k} dtype {g.dtype}"
        assert torch.equal(g.cpu(), w), f"list {k} differs (length {len(g)} vs {len(w)})"


@pytest.mark.parametrize(("scenario", "kind", "dtype"), grid(SCENARIOS))
def test_pair_list_matches_reference_in_row_major_order(scenario, kind, dtype):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n + d)
    dm = ref.signed_distance_matrix(as_ref(x), as_ref(r), kind)
    for pos_lo, neg_hi in ((-INF, INF), (safe_quantile(dm, 0.4), safe_quantile(dm, 0.6))):
        got = pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi)
        want, _, _ = ref_call("pair_list", x, y, r, z, excl, kind, pos_lo, neg_hi)
        _same_lists(got, want)


@pytest.mark.parametrize(("scenario", "kind", "dtype"), grid(SCENARIOS))
def test_triplet_list_matches_reference_in_lexicographic_order(scenario, kind, dtype):
    n, m, d, pattern, case = scenario
    x, y, r, z, excl = make_inputs(n, m, d, pattern, case, dtype, seed=n + d)
    dm = ref.signed_distance_matrix(as_ref(x), as_ref(r), kind)
    # bands on t = d'_an - d'_ap: the differences of the actual distances, midway between neighbours
    diffs = (dm[:, None, :] - dm[:, :, None]).flatten()
    for band_lo, band_hi in ((-INF, INF), (safe_quantile(diffs, 0.5), safe_quantile(diffs, 0.8))):
        got = triplet_list(x, y, r, z, excl, kind, band_lo, band_hi)
        want, _, _ = ref_call("triplet_list", x, y, r, z, excl, kind, band_lo, band_hi)
        _same_lists(got, want)


def test_triplet_list_across_staging_chunks(monkeypatch):
    # a budget of a few rows forces many anchor chunks: offsets must continue across them
    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [40 * 4 * 33])
    x, y, r, z, excl = make_inputs(70, 0, 3, "few", "square", torch.float32, seed=5)
    got = triplet_list(x, y, r, z, excl, "l2", -INF, 0.3)
    want, _, _ = ref_call("triplet_list", x, y, r, z, excl, "l2", -INF, 0.3)
    _same_lists(got, want)


def test_lists_are_empty_when_nothing_qualifies():
    x, y, r, z, excl = make_inputs(40, 0, 3, "one", "square", torch.float32)
    a, p, n = triplet_list(x, y, r, z, excl, "l2", -INF, INF)  # one class: no negatives
    assert a.numel() == p.numel() == n.numel() == 0
    a1, p1, a2, n2 = pair_list(x, y, r, z, excl, "l2", INF, -INF)
    assert a1.numel() == p1.numel() == a2.numel() == n2.numel() == 0

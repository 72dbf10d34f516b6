"""The compiled helpers of the blocked CPU path (fastdml/blocked/native.py, csrc/*.c).

The row scan alone against a masked torch formulation (ties to the lowest column, every exclusion mode, M
below, at and off a multiple of the vector width); ``blocked.row_hardest`` with the scan against its torch
ops, bit for bit; NaN scores handing the call back to the torch ops; the chosen-triplet loop declining
non-finite distances and out-of-range indices (its values and gradients against the reference are in
tests/test_ops_chosen_triplets.py, which runs both ways); and the build itself (no compiler, switched off,
cached), in subprocesses so that this process's loaded library is not disturbed.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from fastdml import blocked
from fastdml.blocked import native
from fastdml.config import memory_budget

from .blocked_cases import KINDS, PATTERNS, make_inputs
from .conftest import TOL

INF = math.inf

needs_native = pytest.mark.skipif(not native.enabled(), reason=f"compiled row scan: {native.status()}")


def masked_extremes(t, y, z, ex):
    """What the scan must return, by torch ops: per row the max over the positive columns and the min over
    the negatives, skipping column ex[i] (-1: none), first extreme; -inf/+inf and index M when there is none."""
    b, m = t.shape
    keep = torch.ones(b, m, dtype=torch.bool)
    rows = torch.nonzero(ex >= 0).flatten()
    keep[rows, ex[rows]] = False
    same = y[:, None] == z[None, :]
    pv, pi = torch.where(same & keep, t, -INF).max(1)
    nv, ni = torch.where(~same & keep, t, INF).min(1)
    pi = torch.where(pv == -INF, m, pi)
    ni = torch.where(nv == INF, m, ni)
    return pv, pi, nv, ni


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m", [1, 7, 8, 16, 17, 40, 100])
@pytest.mark.parametrize("mode", ["none", "diag", "excl"])
def test_native_scan_equals_masked_torch_extremes_ties_included(mode, m, dtype):
    g = torch.Generator().manual_seed(m)
    b = 13
    # small integers: many exact ties, within a vector lane, across lanes and in the tail
    t = torch.randint(-3, 4, (b, m), generator=g).to(dtype)
    y = torch.randint(0, 3, (b,), generator=g)
    z = torch.randint(0, 3, (m,), generator=g)
    y[0] = 7  # a row without any positive
    if mode == "excl":
        ex = torch.randint(-1, m, (b,), generator=g)
    elif mode == "diag":
        ex = torch.arange(b) + 2  # the anchor sits at column diag + i
        ex = torch.where(ex < m, ex, -1)
    else:
        ex = torch.full((b,), -1)
    yc, zc = native.label_codes(y, z, dtype)
    out = [torch.full((b,), float("nan"), dtype=dtype), torch.full((b,), -5), torch.full((b,), float("nan"),
           dtype=dtype), torch.full((b,), -5)]  # fmt: skip
    if mode == "diag":
        # rows past the last column exclude nothing (diag + i >= M never matches a column)
        ok = native.row_hardest_scan(t, yc, zc, None, 2, *out)
    else:
        ok = native.row_hardest_scan(t, yc, zc, None if mode == "none" else ex, -1, *out)
    assert ok
    for got, want, name in zip(out, masked_extremes(t, y, z, ex), ("pv", "pi", "nv", "ni")):
        assert torch.equal(got, want), f"{name}: {got.tolist()} != {want.tolist()}"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", [2, 130])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
def test_row_hardest_compiled_picks_what_its_torch_ops_pick(square, kind, pattern, d, dtype):
    # Where both sweeps take the same GEMMs (rectangular and small-D cases at the default budget: the same row
    # blocks) they must agree bit for bit. The square case with D > 4 takes the upper triangle (other GEMM
    # shapes, other BLAS rounding), and under a tiny budget the torch ops plan room for the gathered
    # positives (other blocks): there the picks must agree and the values within the dtype's tolerance.
    x, y, r, z, excl = make_inputs(53, d, dtype, square, pattern, seed=d + 11)
    for budget_mb in (64.0, 0.01):
        with memory_budget(budget_mb):
            got = blocked.row_hardest(x, y, r, z, excl, kind)
            with native.disabled():
                want = blocked.row_hardest(x, y, r, z, excl, kind)
        same_gemms = budget_mb == 64.0 and (not square or d <= 4)
        for a, b, name in zip(got, want, ("pv", "pi", "pf", "nv", "ni", "nf")):
            if same_gemms or not a.is_floating_point():
                assert torch.equal(a, b), f"{name} differs at budget {budget_mb} MB"
            else:
                torch.testing.assert_close(a, b, **TOL[dtype])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 17, 40, 97])
def test_square_strips_meet_every_candidate_once_and_keep_the_lowest_tie(n, kind, dtype):
    # small integer rows: exact scores and many ties across strips, rows, lanes and the diagonal block, under
    # budgets of one row, a few rows and one block per strip; the reference decides
    from fastdml import reference as ref

    g = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 3, (n, 6), generator=g).to(dtype)
    x = x + torch.arange(n, dtype=dtype)[:, None] * 1e-3  # (distinct rows: no duplicate copies)
    y = torch.randint(0, 4, (n,), generator=g)
    want = ref.row_hardest(x.double(), y, None, None, None, kind)
    for budget_mb in (0.0001, 0.003, 64.0):
        with memory_budget(budget_mb):
            got = blocked.row_hardest(x, y, None, None, None, kind)
        for a, b, name in zip(got, want, ("pv", "pi", "pf", "nv", "ni", "nf")):
            if a.is_floating_point():
                torch.testing.assert_close(a.double(), b, **TOL[dtype])
            else:
                assert torch.equal(a, b), f"{name} at budget {budget_mb} MB"


def test_square_strips_scan_each_strip_against_later_rows_only():
    # the strip scan alone on a hand-made 3-row case: anchor 2's only positive is row 0, met in the column
    # direction of strip 0; anchor 0's only negative is row 1, met in the row direction
    if not native.enabled():
        pytest.skip(native.status())
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    y = native.label_codes(torch.tensor([0, 1, 0]), torch.tensor([], dtype=torch.int64), torch.float32)[0]
    off = (x * x).sum(1)
    bp, bn = torch.full((3,), -INF), torch.full((3,), INF)
    bpi, bni = torch.full((3,), 3, dtype=torch.int32), torch.full((3,), 3, dtype=torch.int32)
    G0 = x[0:1] @ x.t()  # strip 0: row 0 against rows 0..2
    assert native.row_hardest_strip(G0.contiguous(), 0, off, -2.0, y, bp, bpi, bn, bni)
    G1 = x[1:3] @ x[1:].t()  # strip 1: rows 1..2 against rows 1..2
    assert native.row_hardest_strip(G1.contiguous(), 1, off, -2.0, y, bp, bpi, bn, bni)
    q = bp + off  # squared distances: the caller adds |x_a|^2
    assert bpi.tolist() == [2, 3, 0] and q[0].item() == 9.0 and q[2].item() == 9.0
    assert bni.tolist() == [1, 0, 1] and (bn + off).tolist() == [1.0, 1.0, 10.0]


@needs_native
def test_row_hardest_gives_nan_scores_to_the_torch_ops():
    # a NaN coordinate makes NaN scores: the scan declines and the torch ops (which propagate NaN) decide
    x, y, r, z, excl = make_inputs(40, 6, torch.float32, True, "random", seed=2)
    x = x.clone()
    x[5, 2] = float("nan")
    got = blocked.row_hardest(x, y, None, None, None, "l2")
    with native.disabled():
        want = blocked.row_hardest(x, y, None, None, None, "l2")
    for a, b in zip(got, want):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, equal_nan=True)
    assert torch.isnan(got[0]).any() or torch.isnan(got[3]).any()


def test_label_codes_keep_equal_labels_equal_beyond_int32():
    y = torch.tensor([2**40, -(2**40), 3, 2**40])
    z = torch.tensor([3, 2**40, 5])
    yc, zc = native.label_codes(y, z, torch.float32)
    assert yc.dtype == zc.dtype == torch.int32
    assert torch.equal(yc[:, None] == zc[None, :], y[:, None] == z[None, :])
    assert torch.equal(yc[:, None] == yc[None, :], y[:, None] == y[None, :])
    y64, z64 = native.label_codes(y, z, torch.float64)
    assert torch.equal(y64, y) and torch.equal(z64, z)


@needs_native
def test_native_scan_rejects_mismatched_arguments_by_name():
    t = torch.randn(4, 9)
    yc, zc = native.label_codes(torch.zeros(4, dtype=torch.int64), torch.zeros(9, dtype=torch.int64), t.dtype)
    outs = [torch.empty(4), torch.empty(4, dtype=torch.int64), torch.empty(4), torch.empty(4, dtype=torch.int64)]
    with pytest.raises(ValueError, match="z must be"):
        native.row_hardest_scan(t, yc, zc[:8], None, 0, *outs)
    with pytest.raises(ValueError, match="pi must be"):
        native.row_hardest_scan(t, yc, zc, None, 0, outs[0], outs[1].int(), outs[2], outs[3])
    with pytest.raises(ValueError, match="excl must be"):
        native.row_hardest_scan(t, yc, zc, torch.zeros(3, dtype=torch.int64), -1, *outs)
    with pytest.raises(ValueError, match="t must be a contiguous"):
        native.row_hardest_scan(torch.randn(9, 4).t(), yc, zc, None, 0, *outs)


def test_native_scan_declines_inside_disabled():
    with native.disabled():
        assert not native.enabled()
        assert native.status().startswith("off")
        t = torch.randn(2, 3)
        assert not native.row_hardest_scan(t, *native.label_codes(torch.zeros(2).long(), torch.zeros(3).long(),
                                           t.dtype), None, 0, *([None] * 4))  # fmt: skip


_PROBE = """
import torch
from fastdml import blocked, reference
from fastdml.blocked import native
x = torch.randn(30, 5, dtype=torch.float64); y = torch.randint(0, 3, (30,))
got = blocked.row_hardest(x, y, None, None, None, "l2")
want = reference.row_hardest(x, y, None, None, None, "l2")
assert all(torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b) for a, b in zip(got, want))
print(native.status())
"""


def _probe(tmp_path, **env):
    full = {**os.environ, "FASTDML_CACHE_DIR": str(tmp_path / "cache"), **env}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_a_compiler_row_hardest_uses_its_torch_ops_and_says_why(tmp_path):
    status = _probe(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert status.startswith("unavailable: no C compiler"), status


def test_fastdml_native_0_switches_the_scan_off(tmp_path):
    assert _probe(tmp_path, FASTDML_NATIVE="0") == "off: FASTDML_NATIVE=0"
    assert not (tmp_path / "cache").exists()  # nothing was built


@needs_native
def test_the_library_is_built_once_per_cache_and_then_loaded(tmp_path):
    assert _probe(tmp_path) == "on"
    built = sorted((tmp_path / "cache" / "native").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _probe(tmp_path) == "on"
    assert sorted((tmp_path / "cache" / "native").glob("*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def _chosen_inputs(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    p = torch.randint(0, n, (n,), generator=g)
    q = torch.randint(0, n, (n,), generator=g)
    return x, p, q, torch.ones(n, dtype=torch.bool)


@needs_native
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_compiled_chosen_triplets_leave_non_finite_distances_to_torch(bad):
    from fastdml import ops

    x, p, q, valid = _chosen_inputs(12, 5, torch.float32, seed=1)
    x[3, 1] = bad
    assert native.chosen_triplets(x, x, p, q, valid, "l2", 0.2, False, -INF, INF, None, None) is None
    got = ops.chosen_triplet_stats(x, valid, None, p, q, "l2", 0.2)
    with native.disabled():
        want = ops.chosen_triplet_stats(x, valid, None, p, q, "l2", 0.2)
    torch.testing.assert_close(got, want, equal_nan=True)


@needs_native
def test_compiled_chosen_triplets_leave_out_of_range_indices_to_torch():
    from fastdml import ops

    x, p, q, valid = _chosen_inputs(12, 5, torch.float64, seed=2)
    p[4] = 12
    gx = torch.full((12, 5), float("nan"), dtype=torch.float64)
    assert native.chosen_triplets(x, x, p, q, valid, "sql2", 0.2, False, -INF, INF, gx, gx) is None
    assert torch.isnan(gx).all()  # nothing written
    with pytest.raises(IndexError):
        ops.chosen_triplet_stats(x, valid, None, p, q, "sql2", 0.2)


@needs_native
def test_compiled_chosen_triplets_reject_mismatched_arguments_by_name():
    x, p, q, valid = _chosen_inputs(6, 3, torch.float32, seed=3)
    with pytest.raises(ValueError, match="ref must be"):
        native.chosen_triplets(x, x.double(), p, q, valid, "l2", 0.1, False, -INF, INF, None, None)
    with pytest.raises(ValueError, match="valid must be"):
        native.chosen_triplets(x, x, p, q, valid.int(), "l2", 0.1, False, -INF, INF, None, None)
    with pytest.raises(ValueError, match="gx must be"):
        native.chosen_triplets(x, x, p, q, valid, "l2", 0.1, False, -INF, INF, torch.empty(5, 3), None)

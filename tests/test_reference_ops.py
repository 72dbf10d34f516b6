"""The reference ops against hand-written Python loops (float64), and their gradients by gradcheck.

The loops below are the definitions of ARCHITECTURE.md read literally, one pair / triplet at a time, so
they are an independent check of the vectorized reference (which every other path is tested against).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdml import reference as ref

INF = math.inf


def loop_dist(a, b, kind):
    if kind == "dot":
        return -sum(float(u) * float(v) for u, v in zip(a, b))
    q = sum((float(u) - float(v)) ** 2 for u, v in zip(a, b))
    return q if kind == "sql2" else math.sqrt(q)


def loop_setup(x, y, r, z, excl, kind):
    """(dist(i, j), is_pos(i, j), is_neg(i, j)) as Python callables."""
    square = r is None
    rr = x if square else r
    zz = y if square else z

    def skip(i, j):
        if square:
            return i == j
        return excl is not None and int(excl[i]) == j

    def dist(i, j):
        return loop_dist(x[i], rr[j], kind)

    def is_pos(i, j):
        return not skip(i, j) and int(y[i]) == int(zz[j])

    def is_neg(i, j):
        return not skip(i, j) and int(y[i]) != int(zz[j])

    return dist, is_pos, is_neg, x.shape[0], rr.shape[0]


def between(v, lo, hi, lo_strict=True, hi_strict=True):
    ok_lo = lo == -INF or (v > lo if lo_strict else v >= lo)
    ok_hi = hi == INF or (v < hi if hi_strict else v <= hi)
    return ok_lo and ok_hi


def make(n, m, d, classes, dtype=torch.float64, rect=False, seed=0, with_excl=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if not rect:
        return x, y, None, None, None
    r = torch.randn(m, d, generator=g, dtype=dtype)
    z = torch.randint(0, classes, (m,), generator=g)
    excl = None
    if with_excl:
        excl = torch.randint(-1, m, (n,), generator=g)
    return x, y, r, z, excl


CASES = [
    dict(n=7, m=7, d=3, classes=2, rect=False),
    dict(n=9, m=9, d=1, classes=3, rect=False),
    dict(n=6, m=8, d=2, classes=2, rect=True),
    dict(n=5, m=7, d=4, classes=3, rect=True, with_excl=True),
    dict(n=6, m=6, d=3, classes=1, rect=False),  # one class: no negatives
    dict(n=6, m=6, d=3, classes=100, rect=False, seed=3),  # (nearly) all distinct
]
KINDS = ["l2", "sql2", "dot"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_signed_distance_matrix_matches_loops(kind, case):
    x, y, r, z, excl = make(**CASES[case])
    dist, _, _, n, m = loop_setup(x, y, r, z, excl, kind)
    got = ref.signed_distance_matrix(x, r, kind)
    want = torch.tensor([[dist(i, j) for j in range(m)] for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_l2_distance_is_exact_and_has_zero_gradient_at_duplicates():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0 + 1e-7, 2.0, 3.0]], dtype=torch.float32)
    x.requires_grad_(True)
    d = ref.signed_distance_matrix(x, None, "l2")
    assert d[0, 1].item() == 0.0
    assert d[0, 0].item() == 0.0
    # the expansion would give ~3e-4 here; direct differences give the float32-exact 1e-7
    assert abs(d[0, 2].item() - 1.1920929e-07) < 1e-12
    d[0, 1].backward(retain_graph=True)
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize(
    "params",
    [
        dict(pos_margin=0.0, neg_margin=1.0, pos_lo=-INF, neg_hi=INF, low=0.0, high=INF),
        dict(pos_margin=0.3, neg_margin=2.5, pos_lo=-INF, neg_hi=INF, low=-INF, high=INF),
        dict(pos_margin=0.1, neg_margin=2.0, pos_lo=0.5, neg_hi=1.8, low=0.0, high=1.2),
    ],
)
def test_contrastive_stats_matches_loops(kind, case, params):
    x, y, r, z, excl = make(**CASES[case])
    p = dict(params)
    if kind == "dot":  # similarity margins live in d' space as negatives
        p.update(pos_margin=-p["pos_margin"], neg_margin=-p["neg_margin"])
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    sp = cp = sn = cn = 0.0
    for i in range(n):
        for j in range(m):
            dv = dist(i, j)
            if is_pos(i, j) and between(dv, p["pos_lo"], INF):
                t = max(dv - p["pos_margin"], 0.0)
                if between(t, p["low"], p["high"]):
                    sp += t
                    cp += 1
            if is_neg(i, j) and between(dv, -INF, p["neg_hi"]):
                t = max(p["neg_margin"] - dv, 0.0)
                if between(t, p["low"], p["high"]):
                    sn += t
                    cn += 1
    got = ref.contrastive_stats(x, y, r, z, excl, kind, **p)
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, torch.tensor([sp, cp, sn, cn], dtype=torch.float64), atol=1e-10, rtol=1e-10)


TRIPLET_PARAMS = [
    dict(margin=0.2, smooth=False, band_lo=-INF, band_hi=INF, low=0.0, high=INF),
    dict(margin=0.5, smooth=True, band_lo=-INF, band_hi=INF, low=-INF, high=INF),
    dict(margin=0.3, smooth=False, band_lo=0.0, band_hi=0.3, low=-INF, high=INF),  # semihard band
    dict(margin=0.3, smooth=False, band_lo=-INF, band_hi=0.0, low=0.0, high=0.5),  # hard band + threshold
    dict(margin=0.3, smooth=False, band_lo=0.3, band_hi=INF, low=-INF, high=INF),  # easy band
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("params", TRIPLET_PARAMS)
def test_triplet_stats_matches_loops(kind, case, params):
    x, y, r, z, excl = make(**CASES[case])
    p = params
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    s = c = 0.0
    for i in range(n):
        for pp in range(m):
            if not is_pos(i, pp):
                continue
            for nn in range(m):
                if not is_neg(i, nn):
                    continue
                dap, dan = dist(i, pp), dist(i, nn)
                t = dan - dap
                if not between(t, p["band_lo"], p["band_hi"], hi_strict=False):
                    continue
                v = dap - dan + p["margin"]
                term = math.log1p(math.exp(v)) if p["smooth"] else max(v, 0.0)
                if between(term, p["low"], p["high"]):
                    s += term
                    c += 1
    got = ref.triplet_stats(x, y, r, z, excl, kind, **p)
    torch.testing.assert_close(got, torch.tensor([s, c], dtype=torch.float64), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semihard_stats_matches_loops(kind, case, margin):
    x, y, r, z, excl = make(**CASES[case])
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    s = c = 0.0
    for i in range(n):
        negs = [j for j in range(m) if is_neg(i, j)]
        if not negs:
            continue
        for pp in range(m):
            if not is_pos(i, pp):
                continue
            dap = dist(i, pp)
            above = [j for j in negs if dist(i, j) > dap]
            if above:
                nstar = min(above, key=lambda j: (dist(i, j), j))
            else:
                nstar = min(negs, key=lambda j: (-dist(i, j), j))
            s += max(dap - dist(i, nstar) + margin, 0.0)
            c += 1
    got = ref.semihard_stats(x, y, r, z, excl, kind, margin)
    torch.testing.assert_close(got, torch.tensor([s, c], dtype=torch.float64), atol=1e-10, rtol=1e-10)


def loop_row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op):
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    vals, idxs, founds = [], [], []
    for i in range(n):
        best = None
        for j in range(m):
            if not (is_pos(i, j) if side == "pos" else is_neg(i, j)):
                continue
            dv = dist(i, j)
            if not between(dv, lo, hi, lo_strict=False, hi_strict=False):
                continue
            if thr is not None and not (dv > float(thr[i]) if thr_op == "gt" else dv < float(thr[i])):
                continue
            better = best is None or (dv > best[0] if mode == "max" else dv < best[0])
            if better:
                best = (dv, j)
        vals.append(best[0] if best else 0.0)
        idxs.append(best[1] if best else 0)
        founds.append(best is not None)
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(idxs), torch.tensor(founds)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize(
    "side,mode,lo,hi,thr_op",
    [
        ("pos", "max", -INF, INF, ""),
        ("neg", "min", -INF, INF, ""),
        ("pos", "min", -INF, INF, ""),
        ("neg", "max", -INF, INF, ""),
        ("neg", "min", -INF, INF, "gt"),
        ("pos", "max", 0.5, 3.0, "lt"),
        ("neg", "min", 1.0, INF, ""),
    ],
)
def test_row_extreme_matches_loops(kind, case, side, mode, lo, hi, thr_op):
    x, y, r, z, excl = make(**CASES[case])
    n = x.shape[0]
    thr = torch.linspace(-1.0, 3.0, n, dtype=torch.float64) if thr_op else None
    got = ref.row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op)
    want = loop_row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.int64 and got[2].dtype == torch.bool
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])


def test_row_extreme_ties_resolve_to_lowest_index():
    # rows 1, 2 and 3 are duplicates: equal distances from anchor 0 -> the lowest index wins
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0])
    for mode in ("max", "min"):
        v, i, f = ref.row_extreme(x, y, None, None, None, "l2", "pos", mode, -INF, INF, None, "")
        assert int(i[0]) == 1 and bool(f[0]) and float(v[0]) == 1.0
    # float32 input -> float32 value
    v, _, _ = ref.row_extreme(x.float(), y, None, None, None, "l2", "pos", "max", -INF, INF, None, "")
    assert v.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_pair_values_matches_loops(kind):
    x, y, r, z, _ = make(n=6, m=5, d=3, classes=2, rect=True)
    i = torch.tensor([0, 5, 3, 3, 1])
    j = torch.tensor([4, 0, 3, 2, 1])
    got = ref.pair_values(x, r, i, j, kind)
    want = torch.tensor([loop_dist(x[a], r[b], kind) for a, b in zip(i.tolist(), j.tolist())], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    got_sq = ref.pair_values(x, None, i, torch.tensor([1, 2, 3, 4, 0]), kind)
    want_sq = torch.tensor(
        [loop_dist(x[a], x[b], kind) for a, b in zip(i.tolist(), [1, 2, 3, 4, 0])], dtype=torch.float64
    )
    torch.testing.assert_close(got_sq, want_sq, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("band", [(-INF, INF), (-INF, 0.2), (0.0, 0.2), (0.2, INF)])
def test_triplet_list_matches_loops_in_pml_order(kind, case, band):
    x, y, r, z, excl = make(**CASES[case])
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    want = []
    for i in range(n):
        for pp in range(m):
            for nn in range(m):
                if is_pos(i, pp) and is_neg(i, nn):
                    t = dist(i, nn) - dist(i, pp)
                    if between(t, band[0], band[1], hi_strict=False):
                        want.append((i, pp, nn))
    a, p, ng = ref.triplet_list(x, y, r, z, excl, kind, *band)
    assert a.dtype == p.dtype == ng.dtype == torch.int64
    assert list(zip(a.tolist(), p.tolist(), ng.tolist())) == want


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("bounds", [(-INF, INF), (0.5, 1.5), (-1.0, 0.0)])
def test_pair_list_matches_loops_in_pml_order(kind, case, bounds):
    x, y, r, z, excl = make(**CASES[case])
    dist, is_pos, is_neg, n, m = loop_setup(x, y, r, z, excl, kind)
    pos_lo, neg_hi = bounds
    wp = [(i, j) for i in range(n) for j in range(m) if is_pos(i, j) and between(dist(i, j), pos_lo, INF)]
    wn = [(i, j) for i in range(n) for j in range(m) if is_neg(i, j) and between(dist(i, j), -INF, neg_hi)]
    a1, p, a2, ng = ref.pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi)
    assert all(t.dtype == torch.int64 for t in (a1, p, a2, ng))
    assert list(zip(a1.tolist(), p.tolist())) == wp
    assert list(zip(a2.tolist(), ng.tolist())) == wn


def test_pair_list_matches_pml_all_pairs_indices():
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    x, y, *_ = make(n=10, m=10, d=2, classes=3)
    got = ref.pair_list(x, y, None, None, None, "l2", -INF, INF)
    want = lmu.get_all_pairs_indices(y)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    got_t = ref.triplet_list(x, y, None, None, None, "l2", -INF, INF)
    for g, w in zip(got_t, lmu.get_all_triplets_indices(y)):
        assert torch.equal(g, w)


# ---- gradients: float64 gradcheck on small random inputs (margins away from ties) ----


def _gc(fn, *tensors):
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rect", [False, True])
def test_contrastive_stats_gradcheck(kind, rect):
    x, y, r, z, excl = make(n=6, m=5, d=3, classes=2, rect=rect, seed=1)
    pm, nm = (0.3, 2.0) if kind != "dot" else (-0.2, 0.3)
    if rect:
        r.requires_grad_(True)
        x.requires_grad_(True)
        _gc(lambda a, b: ref.contrastive_stats(a, y, b, z, excl, kind, pm, nm, -INF, INF, 0.0, INF)[[0, 2]], x, r)
    else:
        x.requires_grad_(True)
        _gc(lambda a: ref.contrastive_stats(a, y, None, None, None, kind, pm, nm, -INF, INF, 0.0, INF)[[0, 2]], x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("rect", [False, True])
def test_triplet_stats_gradcheck(kind, smooth, rect):
    x, y, r, z, excl = make(n=6, m=5, d=3, classes=2, rect=rect, seed=2)
    x.requires_grad_(True)
    if rect:
        r.requires_grad_(True)
        _gc(lambda a, b: ref.triplet_stats(a, y, b, z, excl, kind, 0.37, smooth, -INF, INF, 0.0, INF)[:1], x, r)
    else:
        _gc(lambda a: ref.triplet_stats(a, y, None, None, None, kind, 0.37, smooth, -INF, INF, 0.0, INF)[:1], x)


@pytest.mark.parametrize("kind", KINDS)
def test_semihard_stats_gradcheck(kind):
    x, y, *_ = make(n=7, m=7, d=3, classes=2, seed=4)
    x.requires_grad_(True)
    _gc(lambda a: ref.semihard_stats(a, y, None, None, None, kind, 0.41)[:1], x)


@pytest.mark.parametrize("kind", KINDS)
def test_pair_values_gradcheck(kind):
    x, y, r, z, _ = make(n=5, m=4, d=3, classes=2, rect=True, seed=5)
    x.requires_grad_(True)
    r.requires_grad_(True)
    i = torch.tensor([0, 4, 2, 2])
    j = torch.tensor([3, 0, 1, 1])
    _gc(lambda a, b: ref.pair_values(a, b, i, j, kind), x, r)
    _gc(lambda a: ref.pair_values(a, None, i, j, kind), x)


def test_empty_inputs_give_zero_stats():
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    s = ref.contrastive_stats(x, y, None, None, None, "l2", 0.0, 1.0, -INF, INF, 0.0, INF)
    assert torch.equal(s.detach(), torch.zeros(4, dtype=torch.float64))
    s = ref.triplet_stats(x, y, None, None, None, "l2", 0.1, False, -INF, INF, 0.0, INF)
    assert torch.equal(s.detach(), torch.zeros(2, dtype=torch.float64))
    s = ref.semihard_stats(x, y, None, None, None, "l2", 0.1)
    assert torch.equal(s.detach(), torch.zeros(2, dtype=torch.float64))
    v, i, f = ref.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, None, "")
    assert v.numel() == i.numel() == f.numel() == 0
    a = ref.triplet_list(x, y, None, None, None, "l2", -INF, INF)
    assert all(t.numel() == 0 for t in a)


def test_nan_propagates_through_unbounded_stats():
    x = torch.randn(6, 3, dtype=torch.float64)
    x[2, 1] = float("nan")
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    s = ref.contrastive_stats(x, y, None, None, None, "l2", 0.0, 1e9, -INF, INF, -INF, INF)
    assert torch.isnan(s[0]) or torch.isnan(s[2])
    s = ref.triplet_stats(x, y, None, None, None, "l2", 0.1, False, -INF, INF, -INF, INF)
    assert torch.isnan(s[0])


def test_softplus_term_matches_torch():
    # the smooth term is softplus(v) = log1p(exp(v)), as PML's smooth_loss
    v = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.allclose(F.softplus(v), torch.log1p(torch.exp(v)))

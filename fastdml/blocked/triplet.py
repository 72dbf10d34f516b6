"""All-triplets and semi-hard triplet statistics on the blocked CPU path (sort-based, O(N M log K)).

Per anchor i, with positives' d' ``a_p`` (p in P(i)) and negatives' d' ``b_n`` (n in Q(i)):

``triplet_stats_fwd`` (hinge): a triplet (p, n) is selected iff ``band_lo < b_n - a_p <= band_hi``,
``v = a_p - b_n + margin``, counted iff ``low < relu(v) < high``. Every such condition is monotone in b_n,
so it reads ``b_n <= T(a_p)`` (upper) or ``b_n > T(a_p)`` (lower) with a float boundary T computed exactly
as the reference evaluates ``t = b - a`` / ``v = (a - b) + margin`` (:func:`thresholds`: a guess ``a + c``
nudged by ulps, so exact ties and tiny constants decide as there). T is non-decreasing in a_p, so sorting
the anchor's positives once (``sa``; only K per anchor) turns each bound into a rank range:

    b_n >  T(a_p)   <=>  rank(p) <  #{T <  b_n}   (searchsorted)
    b_n <= T(a_p)   <=>  rank(p) >= #{T <  b_n}

and the positives forming a counted triplet with negative n are the ranks ``[U_n, L_n)`` (U the max of the
upper bounds, L the min of the lower ones). The active triplets (counted and v > 0) add the bound
``v > 0``: ranks ``[Ua_n, La_n)``. Then, per anchor,

    C     = sum_n (L_n - U_n)^+
    cnt_k = #{n : Ua_n <= k < La_n}         (difference array over ranks + cumsum)
    S     = sum_k cnt_k (sa_k + margin) - sum_n (La_n - Ua_n)^+ b_n
    dS/dd'_ip = cnt_rank(p),  dS/dd'_in = -(La_n - Ua_n)^+

(one searchsorted of the anchor's M values per binding bound, no sort of the negatives), then the
common GEMM-shaped gradient pass. With ``smooth`` (softplus) the sum is not prefix-summable: the
(anchor, positive, negative) block is materialized in chunks within the budget (a slower, documented path).

``semihard_stats_fwd`` (TF-Addons): per positive pair (i, p), n* = the negative with the smallest
``b_n > a_p``, else the farthest negative (ties: lowest index). With ``pos_n = #{sa < b_n}`` (searchsorted),
negative n is above rank k iff ``pos_n > k``; binning negatives by ``pos_n`` (bins are value-ordered) and a
suffix "first non-empty bin" gives n* for every rank at once; ties inside a bin go to the lowest index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import budget, workspace
from .distance import Problem, accumulate_grad, distances, new_parts

INF = math.inf


class PositiveLayout:
    """Where every anchor's positives are: columns sorted by label (stable, so ascending index within a
    label), ``start[i]`` and ``count[i]`` of the run of label ``y_i``. A block gathers its positives into a
    padded ``(b, Kmax)`` tensor in ascending column order."""

    def __init__(self, P: Problem):
        self.colperm = torch.argsort(P.z, stable=True)
        zs = P.z[self.colperm]
        self.start = torch.searchsorted(zs, P.y, side="left")
        self.count = torch.searchsorted(zs, P.y, side="right") - self.start

    def kmax(self, s: int, e: int) -> int:
        return int(self.count[s:e].max()) if e > s else 0

    def gather(self, P: Problem, s: int, e: int, d: torch.Tensor, kmax: int):
        """``(gidx, valid, a)``: (b, Kmax) column of each positive slot, its validity (in the label run and
        not excluded), and its d' (+inf where not valid)."""
        ar = torch.arange(kmax, device=P.device)
        slot = self.start[s:e, None] + ar
        valid = ar[None, :] < self.count[s:e, None]
        gidx = self.colperm[slot.clamp_(max=P.M - 1)]
        if P.square:
            valid &= gidx != torch.arange(s, e, device=P.device)[:, None]
        elif P.excl is not None:
            valid &= gidx != P.excl[s:e, None]
        a = d.gather(1, gidx).masked_fill_(~valid, INF)
        return gidx, valid, a


def _boundary(guess: torch.Tensor, pred, steps: int = 4) -> torch.Tensor:
    """The largest float T near ``guess`` with ``pred(T)`` true, for a predicate true below a boundary and
    false above it (elementwise). ``guess`` is within a few ulps of it; each step moves one ulp."""
    up = torch.full_like(guess, INF)
    down = torch.full_like(guess, -INF)
    T = guess
    for _ in range(steps):
        ok = pred(T)
        nxt = torch.nextafter(T, up)
        T = torch.where(ok & pred(nxt), nxt, torch.where(ok, T, torch.nextafter(T, down)))
    return T


def thresholds(sa: torch.Tensor, spec, margin: float) -> torch.Tensor:
    """Per sorted positive a (b, K), the float boundary T of a bound on the negative's b, written exactly
    as the reference evaluates it (``t = b - a``, ``v = (a - b) + margin``), so ties (t exactly 0, tiny
    constants) decide as there. Upper bounds select ``b <= T``, lower bounds ``b > T``:

    ``("t_le", c)`` upper ``t <= c``; ``("t_gt", c)`` lower ``t > c``; ``("v_gt", c)`` upper ``v > c``;
    ``("v_lt", c)`` lower ``v < c``. T is non-decreasing in a, so it stays sorted; padding stays +inf.
    """
    kind, c = spec
    finite = torch.isfinite(sa)
    a = sa.masked_fill(~finite, 0.0)
    if kind in ("t_le", "t_gt"):  # T = largest b with b - a <= c
        T = _boundary(a + c, lambda b: (b - a) <= c)
    elif kind == "v_gt":  # T = largest b with (a - b) + m > c
        T = _boundary(a + (margin - c), lambda b: ((a - b) + margin) > c)
    elif kind == "v_lt":  # v < c  <=>  b > T, T = largest b with (a - b) + m >= c
        T = _boundary(a + (margin - c), lambda b: ((a - b) + margin) >= c)
    else:
        raise ValueError(kind)
    return T.masked_fill_(~finite, INF)


def _offset(spec, margin: float) -> float:
    """The constant c' of a bound read as ``b (<= or >) a + c'`` (for choosing the binding bound)."""
    kind, c = spec
    return c if kind in ("t_le", "t_gt") else margin - c


def binding(specs, margin: float, upper: bool, scale: float):
    """Drop bounds implied by another with a safe gap (``1e-5 (1 + scale)``, far above rounding): each kept
    bound costs one searchsorted. ``scale`` bounds |a| and |b| of the block."""
    if len(specs) < 2:
        return list(specs)
    gap = 1e-5 * (1.0 + scale)
    offs = [_offset(sp, margin) for sp in specs]
    best = min(offs) if upper else max(offs)
    keep = [sp for sp, o in zip(specs, offs) if abs(o - best) <= gap]
    return keep


def _ranks(thresholds_list, d, combine, out=None, spare=None):
    """#{T < b} per value ``b`` of d for each threshold tensor, combined elementwise by ``combine``
    (``torch.minimum`` for lower bounds, ``torch.maximum`` for upper ones), written into ``out`` (``spare``:
    where the later searches go); None for an empty list."""
    if not thresholds_list:
        return None
    ranks = torch.searchsorted(thresholds_list[0], d, side="left", out=out)
    for T in thresholds_list[1:]:
        combine(ranks, torch.searchsorted(T, d, side="left", out=spare), out=ranks)
    return ranks


def rank_bounds(sa: torch.Tensor, kv: torch.Tensor, d: torch.Tensor, lowers, uppers):
    """Rank range ``[U, L)`` (each (b, M) int64) of the sorted positives ``sa`` (b, K) (+inf padded, ``kv``
    valid) that satisfy every bound for the value ``b = d[i, n]``.

    ``lowers``/``uppers``: threshold tensors T (b, K) (see :func:`thresholds`): a lower bound selects
    ``b > T`` (ranks below #{T < b}), an upper one ``b <= T`` (ranks from #{T < b}). Without lower bounds
    L = kv, without upper bounds U = 0.
    """
    L = _ranks(lowers, d, torch.minimum)
    if L is None:
        L = kv[:, None].expand(d.shape)
    U = _ranks(uppers, d, torch.maximum)
    if U is None:
        U = torch.zeros(d.shape, dtype=torch.int64, device=d.device)
    return U, L


def _relu_bounds(band_lo, band_hi, low, high):
    """Bound specs ``(lowers, uppers, active)`` of the counted interval, and the extra upper bound of the
    active one (``v > 0``; None when the window already implies it)."""
    lowers, uppers = [], []
    if band_lo != -INF:
        lowers.append(("t_gt", band_lo))
    if band_hi != INF:
        uppers.append(("t_le", band_hi))
    if high != INF:
        lowers.append(("v_lt", high))
    low_binds = low != -INF and low >= 0.0
    if low_binds:
        uppers.append(("v_gt", low))  # v > low >= 0 implies v > 0
    return lowers, uppers, (None if low_binds else ("v_gt", 0.0))


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dtype=torch.float64)


def _block_ranks(thresholds_list, d, combine, slot):
    """:func:`_ranks` into the workspace buffer ``slot`` (a spare buffer only when there are several)."""
    if not thresholds_list:
        return None
    shape = d.shape
    spare = workspace.take("triplet.spare", shape, torch.int64, d.device) if len(thresholds_list) > 1 else None
    return _ranks(thresholds_list, d, combine, workspace.take(slot, shape, torch.int64, d.device), spare)


def _relu_block(P, s, e, d, neg, layout, kmax, margin, bounds, active_extra, need_grad, sums):
    """Hinge triplets of block rows s:e; returns the pair weights G (1, b, M) (or None).

    Per negative n the counted ranks are ``[U_n, L_n)`` and the active ones ``[Ua_n, L_n)`` (``L = kv``
    without lower bounds, ``U = 0`` without upper ones, ``Ua = U`` when counted = active); every (b, M)
    temporary is an integer or float pass over a workspace buffer (:mod:`.workspace`)."""
    gidx, pvalid, a = layout.gather(P, s, e, d, kmax)
    sa, sperm = torch.sort(a, dim=1)
    kv = pvalid.sum(1)
    lowers, uppers = bounds
    fin = torch.isfinite(sa)
    dlo, dhi = torch.aminmax(d)  # (|d| without a (b, M) temporary)
    scale = float(torch.where(fin, sa.abs(), 0.0).max()) + float(torch.maximum(dlo.abs(), dhi.abs()))
    lowers = [thresholds(sa, sp, margin) for sp in binding(lowers, margin, False, scale)]
    uppers = [thresholds(sa, sp, margin) for sp in binding(uppers, margin, True, scale)]
    b, m = d.shape
    dev = P.device
    L = _block_ranks(lowers, d, torch.minimum, "triplet.L")
    U = _block_ranks(uppers, d, torch.maximum, "triplet.U")
    if active_extra is None:
        Ua = U  # (a binding window's ("v_gt", low) is an upper bound: U exists)
    else:
        Ua = _block_ranks([thresholds(sa, active_extra, margin)], d, torch.maximum, "triplet.Ua")
        if U is not None:
            torch.maximum(Ua, U, out=Ua)
    del lowers, uppers
    negi = workspace.take("triplet.negi", (b, m), torch.int64, dev).copy_(neg)
    hist = torch.zeros((b, kmax + 1), dtype=torch.int64, device=dev)
    counted = None  # C, when it differs from the active count
    if L is None:
        # L = kv (U <= kv: the thresholds' padding is +inf). Every negative adds +1 at Ua and -1 at kv, so an
        # empty range (Ua = kv) adds nothing and no (b, M) copy of L or of an activity mask is needed.
        if active_extra is not None:
            if U is None:
                counted = (kv * negi.sum(1)).sum()
            else:
                spare = workspace.take("triplet.spare", (b, m), torch.int64, dev)
                counted = torch.sub(kv[:, None], U, out=spare).mul_(negi).sum()
        hist.scatter_add_(1, Ua, negi)
        hist.scatter_add_(1, kv[:, None], negi.sum(1, keepdim=True).neg_())
        cover = Ua.sub_(kv[:, None]).mul_(negi).neg_()  # kv - Ua on the negatives, 0 elsewhere
    else:
        if active_extra is not None:
            c = workspace.take("triplet.spare", (b, m), torch.int64, dev)
            counted = (torch.sub(L, U, out=c) if U is not None else c.copy_(L)).clamp_min_(0).mul_(negi).sum()
        cover = torch.sub(L, Ua, out=workspace.take("triplet.cover", (b, m), torch.int64, dev))
        cover.clamp_min_(0).mul_(negi)
        # +1 at Ua and -1 at L for every negative with a non-empty range (min(cover, 1): the 0/1 activity)
        act = torch.clamp(cover, max=1, out=workspace.take("triplet.act", (b, m), torch.int64, dev))
        hist.scatter_add_(1, Ua, act)
        hist.scatter_add_(1, L, act.neg_())
    cnt = hist.cumsum_(1)[:, :kmax]  # (b, Kmax) active triplets by rank; 0 at ranks >= kv
    sums[1] += cnt.sum() if counted is None else counted  # (every active triplet is one (rank, negative))
    rank_ok = cnt > 0
    sa_f = sa.to(torch.float64).add_(margin).masked_fill_(~rank_ok, 0.0)
    # pair weights of the negatives, -cover_n, in the accumulation dtype (cover <= K is exact there)
    G = workspace.take("triplet.G", (1, b, m), P.acc, dev)
    G[0].copy_(cover).neg_()
    # sum_n cover_n b_n: per-row sums in the accumulation dtype, the rows added in float64
    prod = torch.mul(G[0], d, out=workspace.take("triplet.q", (b, m), P.acc, dev))
    sums[0] += _sum_rows(cnt.to(torch.float64) * sa_f) + _sum_rows(prod.sum(1))
    if not need_grad:
        return None
    cnt_slot = torch.empty_like(cnt).scatter_(1, sperm, cnt)
    G[0].scatter_add_(1, gidx, cnt_slot.to(P.acc))
    return G


def _smooth_block(P, s, e, d, neg, layout, kmax, margin, band_lo, band_hi, low, high, need_grad, sums):
    """Softplus triplets of block rows s:e, materialized per chunk of anchors: (anchor, positive, negative)."""
    gidx, pvalid, a = layout.gather(P, s, e, d, kmax)
    b, m = d.shape
    G = torch.zeros((1, b, m), dtype=P.acc, device=P.device) if need_grad else None
    gpos = torch.zeros((b, kmax), dtype=P.acc, device=P.device) if need_grad else None
    # chunks of (anchors x positive slots) whose (anchor, slot, M) temporaries fit a third of the budget (the
    # block's own (b, M) tensors take the rest; with half, the peak overshot the budget)
    per_slot = m * (8 * P.esize + 4)
    limit = budget.budget_bytes() // 3
    slots = max(1, min(kmax, limit // max(1, per_slot)))
    rows = max(1, limit // max(1, per_slot * kmax)) if slots == kmax else 1
    for cs in range(0, b, rows):
        ce = min(b, cs + rows)
        for ks in range(0, kmax, slots):
            ke = min(kmax, ks + slots)
            A = a[cs:ce, ks:ke, None]
            B = d[cs:ce, None, :]
            mask = pvalid[cs:ce, ks:ke, None] & neg[cs:ce, None, :]
            t = B - A
            if band_lo != -INF:
                mask &= t > band_lo
            if band_hi != INF:
                mask &= t <= band_hi
            del t
            v = (A - B).add_(margin)
            term = F.softplus(v)
            if low != -INF:
                mask &= term > low
            if high != INF:
                mask &= term < high
            sums[0] += torch.where(mask, term, 0.0).sum(dtype=torch.float64)
            sums[1] += mask.sum()
            del term
            if need_grad:
                w = torch.sigmoid_(v).mul_(mask)
                gpos[cs:ce, ks:ke] = w.sum(2)
                G[0, cs:ce].sub_(w.sum(1))
    if need_grad:
        G[0].scatter_add_(1, gidx, gpos.masked_fill_(~pvalid, 0.0))
    return G


def _bytes_per_entry_triplet(P: Problem, need_grad: bool, n_bounds: int) -> int:
    # d, masks, U/L/searchsorted results (int64), cover, the scatter's int64 copy, G, C (sized from RSS
    # measurements of the whole call, see tests/test_blocked_memory.py)
    return 6 * P.esize + 4 + 8 * (5 + n_bounds)


def _sweep(P, layout, rows, block, need_grad, gx, gr):
    """The row-block sweep of the triplet-shaped stats: per block of ``rows`` anchors (skipped when none has a
    positive) the exact d' and negatives, ``G = block(s, e, d, neg, kmax)`` (the block's pair weights, which
    also adds its sums), then the common gradient pass."""
    for s, e in budget.blocks(P.N, rows):
        kmax = layout.kmax(s, e)
        if kmax == 0:
            continue
        shape = (e - s, P.M)
        d, flagged = distances(P, s, e, out=workspace.take("triplet.d", shape, P.acc, P.device))
        masks = [workspace.take(f"triplet.mask{k}", shape, torch.bool, P.device) for k in (0, 1)]
        _, neg = P.masks(s, e, out=masks)
        G = block(s, e, d, neg, kmax)
        if need_grad:
            scratch = workspace.take("triplet.q", shape, P.acc, P.device)
            accumulate_grad(P, s, e, d, flagged, G, gx, gr, scratch=scratch)


def triplet_stats_fwd(x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high, need_grad, need_grad_r=True):
    """``(stats, gx_parts, gr_parts)`` over all triplets (see the module docstring).

    ``stats`` float64 ``[S, C]``; ``gx_parts`` (1, N, D) = dS/dx, ``gr_parts`` (1, M, D) = dS/dr (square case:
    (0, 0, D), gx holding both sides); empty (0, ., D) without ``need_grad``; ``gr_parts`` empty (0, M, D)
    without ``need_grad_r`` (references that need no gradient: no column-side work).
    """
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, "triplet_stats_fwd")
        margin, band_lo, band_hi = float(margin), float(band_lo), float(band_hi)
        low, high = float(low), float(high)
        gx, gr = new_parts(P, 1, need_grad, need_grad_r)
        sums = torch.zeros(2, dtype=torch.float64, device=P.device)
        if P.N == 0 or P.M == 0 or band_lo >= band_hi:
            return sums, gx, gr
        if not smooth and high <= 0.0:
            return sums, gx, gr  # relu(v) >= 0: nothing is below high
        layout = PositiveLayout(P)
        if smooth:
            per_entry = _bytes_per_entry_triplet(P, need_grad, 0)
            rows = budget.rows_per_block(P.N, P.M, per_entry, budget.budget_bytes() // 2)
        else:
            lowers, uppers, active_extra = _relu_bounds(band_lo, band_hi, low, high)
            n_b = len(lowers) + len(uppers) + (active_extra is not None)
            rows = budget.rows_per_block(P.N, P.M, _bytes_per_entry_triplet(P, need_grad, n_b))
        if smooth:

            def block(s, e, d, neg, kmax):
                return _smooth_block(
                    P, s, e, d, neg, layout, kmax, margin, band_lo, band_hi, low, high, need_grad, sums
                )
        else:

            def block(s, e, d, neg, kmax):
                return _relu_block(
                    P, s, e, d, neg, layout, kmax, margin, (lowers, uppers), active_extra, need_grad, sums
                )

        _sweep(P, layout, rows, block, need_grad, gx, gr)
        return sums, gx, gr


# ------------------------------------------------------------------------------------------------------
# semi-hard
# ------------------------------------------------------------------------------------------------------
def _semihard_block(P, s, e, d, neg, layout, kmax, margin, need_grad, sums):
    gidx, pvalid, a = layout.gather(P, s, e, d, kmax)
    b, m = d.shape
    sa, sperm = torch.sort(a, dim=1)
    kv = pvalid.sum(1)
    hasneg = neg.any(1)
    dev = P.device
    # (the (b, M) temporaries live in workspace buffers: see .workspace)
    notneg = torch.logical_not(neg, out=workspace.take("semihard.notneg", (b, m), torch.bool, dev))
    # bin of negative n: pos_n = #{sa < b_n}; non-negatives go to the dummy bin kmax + 1
    bins = torch.searchsorted(sa, d, side="left", out=workspace.take("semihard.bins", (b, m), torch.int64, dev))
    bins.masked_fill_(notneg, kmax + 1)
    binmin = torch.full((b, kmax + 2), INF, dtype=P.acc, device=dev)
    binmin.scatter_reduce_(1, bins, d, reduce="amin")
    cols = torch.arange(m, device=dev).expand(b, m)
    hit = workspace.take("semihard.hit", (b, m), torch.bool, dev)
    torch.eq(d, torch.gather(binmin, 1, bins, out=workspace.take("triplet.q", (b, m), P.acc, dev)), out=hit)
    hit &= neg
    binidx = torch.full((b, kmax + 2), m, dtype=torch.int64, device=dev)
    first = workspace.take("semihard.idx", (b, m), torch.int64, dev)
    torch.where(hit, cols, torch.tensor(m, device=dev), out=first)
    binidx.scatter_reduce_(1, bins, first, reduce="amin")
    del hit, bins, first
    # first non-empty bin >= j, for every j (suffix minimum of the bin numbers)
    big = kmax + 1
    jn = torch.arange(kmax + 1, device=P.device).expand(b, kmax + 1)
    jn = torch.where(binmin[:, : kmax + 1] < INF, jn, big)
    jsuf = jn.flip(1).cummin(1).values.flip(1)
    jstar = jsuf[:, 1:]  # rank k looks at bins >= k + 1  (b, kmax)
    above = jstar < big
    jc = jstar.clamp(max=kmax)
    far = workspace.take("triplet.q", (b, m), P.acc, dev).copy_(d).masked_fill_(notneg, -INF)
    far_val, far_idx = far.max(1) if m > 0 else (None, None)
    dn = torch.where(above, binmin.gather(1, jc), far_val[:, None])
    nstar = torch.where(above, binidx.gather(1, jc), far_idx[:, None])
    rank_ok = (torch.arange(kmax, device=P.device)[None, :] < kv[:, None]) & hasneg[:, None]
    v = (sa - dn).add_(margin).masked_fill_(~rank_ok, 0.0)
    sums[0] += F.relu(v).sum(dtype=torch.float64)
    sums[1] += rank_ok.sum()
    if not need_grad:
        return None
    w = (v > 0).to(P.acc)
    G = workspace.take("triplet.G", (1, b, m), P.acc, dev).zero_()
    G[0].scatter_add_(1, gidx.gather(1, sperm), w)
    G[0].scatter_add_(1, nstar, w.neg())
    return G


def semihard_stats_fwd(x, y, r, z, excl, kind, margin, need_grad, need_grad_r=True):
    """``(stats, gx_parts, gr_parts)`` of TF-Addons' semi-hard triplet loss (see the module docstring).

    ``stats`` float64 ``[S, C]``: ``S = sum relu(a_p - b_n* + margin)`` over the positive pairs of anchors
    with a negative, ``C`` their number. Gradient part: weight ``[v > 0]`` on (i, p), minus that on (i, n*).
    ``need_grad_r=False``: ``gr_parts`` empty (0, M, D), no column-side work.
    """
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, "semihard_stats_fwd")
        margin = float(margin)
        gx, gr = new_parts(P, 1, need_grad, need_grad_r)
        sums = torch.zeros(2, dtype=torch.float64, device=P.device)
        if P.N == 0 or P.M == 0:
            return sums, gx, gr
        layout = PositiveLayout(P)
        per_entry = 5 * P.esize + 8 + 8 * 4  # d, masks, bins (int64), the scatter values, G, C
        rows = budget.rows_per_block(P.N, P.M, per_entry)
        _sweep(
            P,
            layout,
            rows,
            lambda s, e, d, neg, kmax: _semihard_block(P, s, e, d, neg, layout, kmax, margin, need_grad, sums),
            need_grad,
            gx,
            gr,
        )
        return sums, gx, gr

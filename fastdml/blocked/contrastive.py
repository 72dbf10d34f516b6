"""All-pairs contrastive statistics on the blocked CPU path.

For every pair (i, j) (positives ``j in P(i)``, negatives ``j in Q(i)``)::

    positive: selected iff d' > pos_lo,  term t = relu(d' - pos_margin)
    negative: selected iff d' < neg_hi,  term t = relu(neg_margin - d')
    counted iff selected and low < t < high (an infinite bound imposes no condition)

    stats = [S+, C+, S-, C-]   (sums of counted terms, their numbers; float64)
    part 0 = dS+/d(x, r): pair weight  [counted, d' - pos_margin > 0]
    part 1 = dS-/d(x, r): pair weight -[counted, neg_margin - d' > 0]

Since t is monotone in d', "counted" and "counted with t > 0" (active) are each an open interval of d'
(:func:`intervals`), so every mask is one or two float comparisons written straight into a float tensor.

Layout: rows and columns are sorted by label first (stats are order-free; the gradient is scattered back),
so the positives of a block of rows are a few rectangles of columns (one per label run). The positive
branch runs on those rectangles only (for C classes about 1/C of the pairs, small GEMMs), the negative
branch on the whole block with the rectangles zeroed. With many label runs in a block (over
``MAX_RECTS``) the positive branch uses a label-equality mask over the block instead.

Square case (x against itself): d' and every weight are symmetric, so only the tiles on and above the
diagonal are computed (:func:`_square_tiles`): an off-diagonal tile stands for both orders of its pairs
(its sums and counts count twice; its gradient goes to both its rows and its columns), a diagonal tile holds
both orders itself. That halves the distance GEMM and the elementwise passes. Tiles are at most
``TILE x TILE`` (about 1 MB per temporary in fp32: they stay in cache and keep the peak low).

Gradient in the forward: the pair weights go through the common GEMM-shaped pass (see :mod:`.distance`);
in the square case the weights are symmetric, so the column side equals the row side (added twice).

Small D (direct differences, ``D <= 4``), at most ``dispatch.DENSE_SWEEP_MAX_N`` rows and the whole (N, N)
pass within the budget: one dense pass (:func:`_square_dense_direct`), the gradient by direct differences
too, so no near-duplicate is taken apart and a small batch costs a few dozen ops instead of the tile
sweep's hundred or more.

With the compiled helpers (:mod:`.native`) the square case runs :func:`_square_native` instead: per tile one
distance GEMM and one C pass (``csrc/contrastive_tile.c``) for everything elementwise, then the gradient
GEMMs; the torch sweep (:func:`_square_tiles`) is the fallback with the same results within rounding.
"""

from __future__ import annotations

import bisect
import functools
import math

import torch

from .. import dispatch
from . import budget, native
from .distance import NEAR_REL, Problem, _direct_q, canonical_columns, distances, new_parts

INF = math.inf
# above this many label runs in a block, positives use a label mask over the block instead of rectangles
MAX_RECTS = 32
# largest side of a square-case tile: 512 x 512 fp32 temporaries are 1 MB (cache-resident)
TILE = 512
# largest side of the compiled sweep's tiles (measured against 512: more, smaller GEMMs above the diagonal)
NATIVE_TILE = 256
# label runs shorter than this take their positives' gradient by direct differences in the compiled tile (a
# GEMM pair per short run costs more in calls than in arithmetic)
DIRECT_RUN = 32


def _largest(guess: float, pred, dtype) -> float:
    """The largest float of ``dtype`` near ``guess`` where ``pred`` (true below a boundary) holds."""
    from .triplet import _boundary

    return float(_boundary(torch.tensor(guess, dtype=dtype), pred))


def _after(t: float, dtype) -> float:
    """The next float of ``dtype`` above t (so ``d <= t`` reads ``d < _after(t)``)."""
    return float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(INF, dtype=dtype)))


@functools.lru_cache(maxsize=256)
def intervals(pos_margin, neg_margin, pos_lo, neg_hi, low, high, dtype=torch.float64):
    """Open d'-intervals ``(lo, hi)`` of the counted and the active (counted, t > 0) pairs:
    ``(pos_counted, pos_active, neg_counted, neg_active)``, or None when nothing can be counted.

    Positives ``t = relu(d' - pm)``: ``t > low`` (low >= 0) is ``d' > pm + low``, ``t < high`` is
    ``d' < pm + high``; active adds ``d' > pm``. Negatives ``t = relu(nm - d')``: ``t > low`` is
    ``d' < nm - low``, ``t < high`` is ``d' > nm - high``; active adds ``d' < nm``. The window's edges
    are the exact float boundaries of the reference's ``d' - pm`` / ``nm - d'`` in ``dtype`` (so ties and
    tiny constants decide as there).
    """
    if high <= 0.0:
        return None  # terms are >= 0
    pm, nm = pos_margin, neg_margin
    low_binds = low != -INF and low >= 0.0
    c = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    if low_binds:
        # positives: d - pm > low  <=>  d > T, T = largest d with d - pm <= low
        p_lo = _largest(pm + low, lambda d: (d - c(pm)) <= c(low), dtype)
        # negatives: nm - d > low  <=>  d <= T, T = largest d with nm - d > low
        n_hi = _after(_largest(nm - low, lambda d: (c(nm) - d) > c(low), dtype), dtype)
    if high != INF:
        # positives: d - pm < high  <=>  d <= T (T = largest d with d - pm < high)
        p_hi = _after(_largest(pm + high, lambda d: (d - c(pm)) < c(high), dtype), dtype)
        # negatives: nm - d < high  <=>  d > T (T = largest d with nm - d >= high)
        n_lo = _largest(nm - high, lambda d: (c(nm) - d) >= c(high), dtype)
    pc = (max(pos_lo, p_lo) if low_binds else pos_lo, p_hi if high != INF else INF)
    pa = (max(pc[0], pm), pc[1])
    nc = (n_lo if high != INF else -INF, min(neg_hi, n_hi) if low_binds else neg_hi)
    na = (nc[0], min(nc[1], nm))
    return pc, pa, nc, na


def _q_bound(t: float, strict_below: bool, dtype) -> float:
    """For l2 (d = sqrt(q), correctly rounded and monotone): the q-boundary of a d-boundary ``t >= 0``.
    ``strict_below``: the smallest q with sqrt(q) >= t (so ``d < t`` iff ``q < it``); else the largest q with
    sqrt(q) <= t (so ``d > t`` iff ``q > it``)."""
    if t * t >= torch.finfo(dtype).max:
        return INF
    if strict_below:
        return _after(_largest(t * t, lambda v: torch.sqrt(v) < t, dtype), dtype)
    return _largest(t * t, lambda v: torch.sqrt(v) <= t, dtype)


@functools.lru_cache(maxsize=256)
def q_intervals(iv, dtype):
    """The open d-intervals of :func:`intervals` as open intervals of q = d^2 (l2 kind): same masks."""

    def conv(lo_hi):
        lo, hi = lo_hi
        if not lo < hi or hi <= 0.0:
            return (0.0, 0.0)  # empty (d >= 0)
        qlo = -INF if lo < 0.0 else _q_bound(lo, False, dtype)
        qhi = INF if hi == INF else _q_bound(hi, True, dtype)
        return (qlo, qhi)

    return tuple(conv(v) for v in iv)


def _interval_mask(d: torch.Tensor, iv, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None):
    """Float mask ``lo < d < hi`` (1.0 / 0.0), comparisons written straight into a float tensor (``out``,
    and ``tmp`` for the second comparison when both bounds are finite; fresh tensors when not given)."""
    lo, hi = iv
    if out is None:
        out = torch.empty_like(d)
    if not lo < hi:
        return out.zero_()
    if hi != INF:
        torch.lt(d, hi, out=out)
        if lo != -INF:
            out.mul_(torch.gt(d, lo, out=torch.empty_like(d) if tmp is None else tmp))
    elif lo != -INF:
        torch.gt(d, lo, out=out)
    else:
        out.fill_(1.0)
    return out


def _label_runs(P: Problem):
    """Per run of equal labels in the sorted rows: (row_start, row_end, col_start, col_end) as lists."""
    labels, counts = torch.unique_consecutive(P.y, return_counts=True)
    rend = torch.cumsum(counts, 0)
    rstart = rend - counts
    cstart = torch.searchsorted(P.z, labels, side="left")
    cend = torch.searchsorted(P.z, labels, side="right")
    return rstart.tolist(), rend.tolist(), cstart.tolist(), cend.tolist()


def _rects(runs, s: int, e: int):
    """Positive rectangles of block rows s:e: (r0, r1, c0, c1), rows block-relative."""
    rstart, rend, cstart, cend = runs
    out = []
    # runs are sorted by row: find the first run ending after s
    lo, hi = 0, len(rstart)
    while lo < hi:
        mid = (lo + hi) // 2
        if rend[mid] <= s:
            lo = mid + 1
        else:
            hi = mid
    k = lo
    while k < len(rstart) and rstart[k] < e:
        if cend[k] > cstart[k]:
            out.append((max(rstart[k], s) - s, min(rend[k], e) - s, cstart[k], cend[k]))
        k += 1
    return out


def _part(g, k):
    """Part k of the column-side parts, or None when there are none (square case, or no gradient for r)."""
    return g[k] if g.shape[0] else None


def _pair_grad(P, xi, xj, gi, gj, A, d, sign, orders, zero_invalid):
    """Gradient of one branch between rows ``xi`` and references ``xj`` with active mask A (consumed).

    Pair weights ``sign * A`` (``sign`` +1 for S+, -1 for S-), turned into ``C = A / d`` (l2), ``2 A`` (sql2)
    or used as they are (dot, ``d' = -x.r``). Each weight stands for ``orders`` ordered pairs (1; 2 when
    the square case counts (i, j) and (j, i) once). Row side ``orders (rowsum(C) x_i - C x_J)`` into ``gi``;
    the column side ``orders (colsum(C) x_j - C^T x_I)`` into ``gj`` unless it is None (no gradient for the
    references, or the transposed entries are swept themselves).
    """
    if P.kind == "dot":
        gi.addmm_(A, xj, alpha=-orders * sign)
        if gj is not None:
            gj.addmm_(A.t(), xi, alpha=-orders * sign)
        return
    if P.kind == "sql2":
        C, scale = A, 2.0 * orders * sign
    else:
        C, scale = A.div_(d), orders * sign
    zero_invalid(C)  # 0/0 on the diagonal and at flagged near-duplicates (taken by direct differences)
    gi.addmm_(C, xj, alpha=-scale)
    gi.addcmul_(C.sum(1, keepdim=True), xi, value=scale)
    if gj is not None:
        gj.addmm_(C.t(), xi, alpha=-scale)
        gj.addcmul_(C.sum(0).unsqueeze(1), xj, value=scale)


def _block_grad(P, s, A, d, r0, r1, c0, c1, gx_k, gr_k, sign, zero_invalid, symmetric):
    """:func:`_pair_grad` on rows ``s + r0 : s + r1`` x columns ``c0:c1`` of a row block (square fallback:
    symmetric weights, the row side counted twice)."""
    gj = None if (symmetric or gr_k is None) else gr_k[c0:c1]
    _pair_grad(
        P,
        P.x[s + r0 : s + r1],
        P.r[c0:c1],
        gx_k[s + r0 : s + r1],
        gj,
        A,
        d,
        sign,
        2.0 if symmetric else 1.0,
        zero_invalid,
    )


def _bytes_per_entry(P: Problem, need_grad: bool) -> int:
    # d, the negative mask/weights, a comparison temporary, the term temporary (+ slack for rectangles)
    return 7 * P.esize + 2


def contrastive_stats_fwd(
    x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high, need_grad, need_grad_r=True
):
    """``(stats, gx_parts, gr_parts)`` of the all-pairs contrastive loss (see the module docstring).

    ``stats`` float64 ``[S+, C+, S-, C-]``; ``gx_parts`` (2, N, D) = ``[dS+/dx, dS-/dx]`` and ``gr_parts``
    (2, M, D) likewise for r (rectangular case; (0, 0, D) in the square case, where gx holds row and
    column contributions); both empty (0, ., D) without ``need_grad``; ``gr_parts`` empty (0, M, D) without
    ``need_grad_r`` (references that need no gradient: no column-side work at all).
    """
    with torch.no_grad():
        P0 = Problem(x, y, r, z, excl, kind, "contrastive_stats_fwd")
        pm, nm = float(pos_margin), float(neg_margin)
        sums = torch.zeros(4, dtype=torch.float64, device=P0.device)
        iv = intervals(pm, nm, float(pos_lo), float(neg_hi), float(low), float(high), P0.acc)
        if P0.N == 0 or P0.M == 0 or iv is None:
            gx, gr = new_parts(P0, 2, need_grad, need_grad_r)
            return sums, gx, gr
        P, rperm, cperm = P0.sorted_by_label()
        gxs, grs = new_parts(P, 2, need_grad, need_grad_r)
        fixed = (gxs.numel() + grs.numel()) * P.esize  # the parts in the original order, written at the end
        if P.square and canonical_columns(P) is None:
            if _dense_direct_fits(P, fixed):
                _square_dense_direct(P, pm, nm, iv, need_grad, sums, gxs)
            elif not _square_native(P, pm, nm, iv, need_grad, sums, gxs, fixed):
                _square_tiles(P, pm, nm, iv, _label_runs(P), need_grad, sums, gxs, fixed)
        else:
            runs = _label_runs(P)
            rows = budget.rows_per_block(P.N, P.M, _bytes_per_entry(P, need_grad), fixed)
            for s, e in budget.blocks(P.N, rows):
                _block(P, s, e, pm, nm, iv, runs, need_grad, sums, gxs, grs)
        # the parts back in the original order: a gather with the inverse permutations (index_copy_ along
        # dimension 1 is a scalar loop, several times slower)
        gx = gxs.index_select(1, _inverse(rperm)) if gxs.shape[0] else gxs
        gr = grs.index_select(1, _inverse(cperm)) if grs.shape[0] else grs
        return sums, gx, gr


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation: ``_inverse(p)[p[i]] = i``."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _block(P, s, e, pm, nm, iv, runs, need_grad, sums, gx, gr):
    pc, pa, nc, na = iv
    d, flagged = distances(P, s, e)
    b, m = d.shape
    symmetric = P.square
    rects = _rects(runs, s, e)
    ex = P.excluded_cols(s, e)
    use_rects = len(rects) <= MAX_RECTS

    # near-duplicates (L2 only): their weights are taken out of C and added by direct differences
    fl = flagged if (need_grad and P.kind == "l2") else None
    if fl is not None:
        fi, fj = fl

    def zero_flagged_in(C, r0, c0):
        # C is the sub-block rows r0.., cols c0..; zero the diagonal and the flagged pairs inside it
        h, w = C.shape
        if P.square:
            C.diagonal((s + r0) - c0).zero_()
        if fl is not None:
            inside = (fi >= r0) & (fi < r0 + h) & (fj >= c0) & (fj < c0 + w)
            if bool(inside.any()):
                C[fi[inside] - r0, fj[inside] - c0] = 0.0

    # ---------------- positives
    if use_rects:
        for r0, r1, c0, c1 in rects:
            sub = d[r0:r1, c0:c1]
            Aa = _interval_mask(sub, pa)
            Ac = Aa if pc == pa else _interval_mask(sub, pc)
            _zero_excluded(P, s, ex, [Aa] if Ac is Aa else [Aa, Ac], r0, r1, c0, c1)
            sums[0] += torch.linalg.vecdot(Aa, sub - pm, dim=1).sum(dtype=torch.float64)
            sums[1] += Ac.sum(1).sum(dtype=torch.float64)
            if need_grad:
                _block_grad(
                    P,
                    s,
                    Aa,
                    sub,
                    r0,
                    r1,
                    c0,
                    c1,
                    gx[0],
                    _part(gr, 0),
                    1.0,
                    lambda C, r0=r0, c0=c0: zero_flagged_in(C, r0, c0),
                    symmetric,
                )
    else:
        same = torch.eq(P.y[s:e, None], P.z[None, :], out=torch.empty_like(d))
        if ex is not None:
            same[ex] = 0.0
        Aa = _interval_mask(d, pa).mul_(same)
        Ac = Aa if pc == pa else _interval_mask(d, pc).mul_(same)
        sums[0] += torch.linalg.vecdot(Aa, d - pm, dim=1).sum(dtype=torch.float64)
        sums[1] += Ac.sum(1).sum(dtype=torch.float64)
        del Ac
        if need_grad:
            _block_grad(
                P, s, Aa, d, 0, b, 0, m, gx[0], _part(gr, 0), 1.0, lambda C: zero_flagged_in(C, 0, 0), symmetric
            )
        del Aa

    # ---------------- negatives (the whole block, positives and excluded pairs zeroed)
    An = _interval_mask(d, na)
    Nc = An if nc == na else _interval_mask(d, nc)
    masks = [An] if Nc is An else [An, Nc]
    _zero_positives(masks, rects, None if use_rects else same)  # (excluded pairs are zeroed just below)
    same = None  # (the (b, M) mask is released here, before the sums)
    if ex is not None:
        for t in masks:
            t[ex] = 0.0
    sums[2] += torch.linalg.vecdot(An, torch.rsub(d, nm), dim=1).sum(dtype=torch.float64)
    sums[3] += Nc.sum(1).sum(dtype=torch.float64)
    del Nc, masks
    if need_grad:
        _block_grad(P, s, An, d, 0, b, 0, m, gx[1], _part(gr, 1), -1.0, lambda C: zero_flagged_in(C, 0, 0), symmetric)
        del An
        if fl is not None:
            gcol = None if (symmetric or not gr.shape[0]) else gr
            _flagged_direct(P, s, 0, fi, fj, d[fi, fj], pa, na, gx, gcol, 2.0 if symmetric else 1.0)


def _zero_positives(masks, rects, same):
    """Zero the positive pairs in each negative mask: the label runs' rectangles (``same`` None), else where
    ``same`` (the 0/1 same-label mask, consumed: complemented in place) is 1."""
    if same is None:
        for r0, r1, c0, c1 in rects:
            for t in masks:
                t[r0:r1, c0:c1] = 0.0
        return
    notsame = same.neg_().add_(1.0)
    for t in masks:
        t.mul_(notsame)


def _zero_excluded(P, s, ex, tensors, r0, r1, c0, c1):
    """Zero the excluded pairs (diagonal / excl) that fall inside the rectangle rows r0:r1, cols c0:c1."""
    if P.square:
        for t in tensors:
            t.diagonal((s + r0) - c0).zero_()
        return
    if ex is None:
        return
    ri, cj = ex
    inside = (ri >= r0) & (ri < r1) & (cj >= c0) & (cj < c1)
    if bool(inside.any()):
        for t in tensors:
            t[ri[inside] - r0, cj[inside] - c0] = 0.0


def _flagged_direct(P, s, c0, fi, fj, df, pa, na, gx, gcol, orders):
    """L2 gradient of the flagged near-duplicate pairs (x_(s + fi), r_(c0 + fj)) with distances ``df``, by
    direct differences: ``orders w/d (x_i - r_j)`` on row i, its negative on reference j when ``gcol`` (parts
    of the column side) is given; 0 at d = 0."""
    same = P.y[s + fi] == P.z[c0 + fj]
    if not P.square and P.excl is not None:
        excluded = fj + c0 == P.excl[s + fi]
        wp = same & ~excluded & _in_interval(df, pa)
        wn = (~same) & ~excluded & _in_interval(df, na)
    else:
        wp = same & _in_interval(df, pa)
        wn = (~same) & _in_interval(df, na)
    inv = torch.where(df > 0, 1.0 / torch.where(df > 0, df, torch.ones_like(df)), torch.zeros_like(df))
    diff = P.x[s + fi] - P.r[c0 + fj]
    for k, (w, sign) in enumerate(((wp, 1.0), (wn, -1.0))):
        contrib = (w.to(df.dtype) * inv * sign).unsqueeze(1) * diff
        gx[k].index_add_(0, s + fi, contrib, alpha=orders)
        if gcol is not None:
            gcol[k].index_add_(0, c0 + fj, contrib, alpha=-orders)


def _in_interval(v, iv):
    lo, hi = iv
    out = torch.ones_like(v, dtype=torch.bool)
    if lo != -INF:
        out &= v > lo
    if hi != INF:
        out &= v < hi
    return out


# ------------------------------------------------------------------------------------------------------
# square case: the tiles on and above the diagonal
# ------------------------------------------------------------------------------------------------------
def _tile_side(P: Problem, fixed: int) -> int:
    """Side of the square tiles: at most TILE, and ``side^2 * bytes_per_entry`` within the budget.

    The O(N D) part (``fixed``: the label-sorted copies of the gradient parts) is planned beside the tiles,
    not against them: a problem whose parts alone exceed the budget (N = 65,536, D = 128) still sweeps
    cache-sized tiles instead of degenerating to 1 x 1 tiles (N^2 / 2 Python-level steps). Its plan is
    logged as ``side^2 * bytes_per_entry + fixed``.
    """
    per = _bytes_per_entry(P, True)
    side = int(math.isqrt(max(1, budget.budget_bytes() // per)))
    side = max(1, min(side, TILE, P.N))
    if budget.peak_log is not None:
        budget.peak_log.append(side * side * per + int(fixed))
    return side


class _Sums:
    """Per-row partial sums of the four stats, kept as tensors and added once at the end (a float64 scalar
    update per rectangle would cost more Python-side ops than the rectangle's arithmetic)."""

    def __init__(self):
        self.parts = ([], [], [], [])  # (weight, per-row sums) per stat

    def add(self, k: int, weight: float, rows: torch.Tensor) -> None:
        self.parts[k].append((weight, rows))

    def total(self, out: torch.Tensor) -> None:
        for k, items in enumerate(self.parts):
            for weight in sorted({w for w, _ in items}):
                vs = [v for w, v in items if w == weight]
                out[k] += weight * torch.cat(vs).sum(dtype=torch.float64)


class _Work:
    """Per-call workspace of the square sweep: flat buffers handed out as contiguous (h, w) views, so the
    tiles reuse the same memory (fresh allocations of this size cost a page fault per 4 kB page)."""

    def __init__(self, n_buffers: int, entries: int, dtype, device):
        self.bufs = [torch.empty(entries, dtype=dtype, device=device) for _ in range(n_buffers)]

    def views(self, h: int, w: int):
        return [b[: h * w].view(h, w) for b in self.bufs]


def _square_tiles(P, pm, nm, iv, runs, need_grad, sums, gx, fixed):
    """Sweep the tiles (I, J), J >= I, of the sorted square problem (see the module docstring)."""
    side = _tile_side(P, fixed)
    tiles = list(budget.blocks(P.N, side))
    acc = _Sums()
    work = _Work(5, side * side, P.acc, P.device)
    qiv = q_intervals(iv, P.acc) if P.kind == "l2" else iv
    for a, (si, ei) in enumerate(tiles):
        for sj, ej in tiles[a:]:
            _tile(P, si, ei, sj, ej, pm, nm, iv, qiv, runs, need_grad, acc, gx, work)
    acc.total(sums)


def _tile_rects(runs, si, ei, sj, ej):
    """Positive rectangles of tile rows si:ei x cols sj:ej (tile-relative): the label runs meeting both."""
    rstart, rend, _, _ = runs
    out = []
    # square case: a run's rows and columns are the same range; runs are sorted, start at the first run
    # that ends after si (sj >= si)
    for k in range(bisect.bisect_right(rend, si), len(rstart)):
        r0, r1 = rstart[k], rend[k]
        if r0 >= ei or r0 >= ej:
            break
        a0, a1 = max(r0, si), min(r1, ei)
        b0, b1 = max(r0, sj), min(r1, ej)
        if a0 < a1 and b0 < b1:
            out.append((a0 - si, a1 - si, b0 - sj, b1 - sj))
    return out


def _tile(P, si, ei, sj, ej, pm, nm, iv, qiv, runs, need_grad, acc, gx, work):
    """One tile: ``iv`` the d'-intervals, ``qiv`` the same intervals on q = d'^2 for l2 (else ``iv``).

    For l2 the masks are taken on q and sqrt (a slow instruction) runs on the positive rectangles and, only
    when some negative is active, on the tile; a tile without an active negative skips that branch's
    arithmetic and GEMMs altogether (its terms and weights are all 0), and when no pair of the tile lies
    inside the active window at all (and counted = active), it skips the branch's masks too (figures in
    ``bench/RESULTS.md``).
    """
    pc, pa, nc, na = iv
    qpc, qpa, qnc, qna = qiv
    diagonal = si == sj
    wt = 1.0 if diagonal else 2.0  # an off-diagonal entry stands for the pairs (i, j) and (j, i)
    h, w = ei - si, ej - sj
    bq, ba, bb, bc, bd = work.views(h, w)
    l2 = P.kind == "l2"
    mins = []  # (l2/sql2: the row minima of q, the diagonal left out)
    q, flagged = distances(P, si, ei, root=False, cols=(sj, ej), out=bq, row_min=mins)
    d = None if l2 else q  # d' of the tile, computed on demand for l2
    rects = _tile_rects(runs, si, ei, sj, ej)
    use_rects = len(rects) <= MAX_RECTS
    fl = flagged if (need_grad and l2) else None
    xi, xj = P.x[si:ei], P.x[sj:ej]

    def zero_invalid(C, r0=0, c0=0):
        # C covers tile rows r0.., cols c0..: zero the global diagonal and the flagged pairs inside it
        if diagonal:
            C.diagonal(r0 - c0).zero_()
        if fl is not None:
            hh, ww = C.shape
            fi, fj = fl
            inside = (fi >= r0) & (fi < r0 + hh) & (fj >= c0) & (fj < c0 + ww)
            if bool(inside.any()):
                C[fi[inside] - r0, fj[inside] - c0] = 0.0

    def zero_diag(masks, r0=0, c0=0):
        if diagonal:
            for t in masks:
                t.diagonal(r0 - c0).zero_()

    # ---------------- positives
    if use_rects:
        # the label runs' rectangles are small (about 1/C of the tile): plain temporaries
        for r0, r1, c0, c1 in rects:
            subq = q[r0:r1, c0:c1]
            Aa = _interval_mask(subq, qpa)
            Ac = Aa if qpc == qpa else _interval_mask(subq, qpc)
            zero_diag([Aa] if Ac is Aa else [Aa, Ac], r0, c0)
            sub = subq.sqrt() if l2 else subq
            acc.add(0, wt, torch.linalg.vecdot(Aa, sub - pm if pm else sub, dim=1))
            acc.add(1, wt, Ac.sum(1))
            if need_grad:
                gj = None if diagonal else gx[0, sj + c0 : sj + c1]
                _pair_grad(
                    P,
                    xi[r0:r1],
                    xj[c0:c1],
                    gx[0, si + r0 : si + r1],
                    gj,
                    Aa,
                    sub,
                    1.0,
                    2.0,
                    lambda C, r0=r0, c0=c0: zero_invalid(C, r0, c0),
                )
    else:
        if d is None:
            d = torch.sqrt(q, out=bd)
        same = torch.eq(P.y[si:ei, None], P.y[None, sj:ej], out=bb)
        zero_diag([same])
        Aa = _interval_mask(d, pa, out=ba, tmp=bc).mul_(same)
        acc.add(0, wt, torch.sub(d, pm, out=bc).mul_(Aa).sum(1))
        Ac = Aa if pc == pa else _interval_mask(d, pc, out=bc, tmp=None).mul_(same)
        acc.add(1, wt, Ac.sum(1))
        del Ac
        if need_grad:
            _pair_grad(P, xi, xj, gx[0, si:ei], None if diagonal else gx[0, sj:ej], Aa, d, 1.0, 2.0, zero_invalid)
        del Aa

    # ---------------- negatives (the whole tile, positives and the diagonal zeroed)
    # no pair inside the active window (q >= its upper end everywhere, from the row minima the near-duplicate
    # check took; no flagged entry) and counted = active: no negative term, so skip without a tile pass
    if (mins and qna[0] == -INF and qnc == qna and flagged is None and qna[1] != INF
            and bool(mins[0].amin() >= qna[1])):  # fmt: skip
        return
    An = _interval_mask(q, qna, out=ba, tmp=bc)
    Nc = An if qnc == qna else _interval_mask(q, qnc, out=bc, tmp=None)
    masks = [An] if Nc is An else [An, Nc]
    _zero_positives(masks, rects, None if use_rects else same)
    same = None
    zero_diag(masks)
    counts = Nc.sum(1)
    acc.add(3, wt, counts)
    # the active set is a subset of the counted one unless the reducer's window is the narrower; a tile with
    # no active negative contributes nothing more (one host read per tile)
    any_active = bool(counts.any()) if Nc is An else bool(An.any())
    del Nc, masks
    if any_active:
        if d is None:
            d = torch.sqrt(q, out=bd)
        # S- = sum An (nm - d), taken as -sum An (d - nm) in a reused buffer
        acc.add(2, -wt, torch.sub(d, nm, out=bb).mul_(An).sum(1))
        if need_grad:
            _pair_grad(P, xi, xj, gx[1, si:ei], None if diagonal else gx[1, sj:ej], An, d, -1.0, 2.0, zero_invalid)
    del An
    if fl is not None:
        fi, fj = fl
        _flagged_direct(P, si, sj, fi, fj, q[fi, fj].sqrt(), pa, na, gx, None if diagonal else gx, 2.0)


# ------------------------------------------------------------------------------------------------------
# square case, small D, the whole matrix at once
# ------------------------------------------------------------------------------------------------------
def _dense_direct_fits(P: Problem, fixed: int) -> bool:
    """:func:`fastdml.dispatch.contrastive_dense_sweep` for ``P`` (its plan logged when it applies)."""
    if not dispatch.contrastive_dense_sweep(P.direct, P.N, P.esize, fixed):
        return False
    if budget.peak_log is not None:
        budget.peak_log.append(dispatch.dense_sweep_bytes(P.N, P.esize) + int(fixed))
    return True


def _square_dense_direct(P, pm, nm, iv, need_grad, sums, gx) -> None:
    """The square case for small D in one pass over the whole matrix (a small problem).

    q by direct differences (as in the tiles, so the same masks), then the gradient by direct differences
    too, ``scale sum_j c_ij (x_i - x_j)`` one coordinate at a time with ``c = A / d`` (l2; 0 at d = 0) or
    ``A`` (sql2): exact for near-duplicates, so no pair is taken apart, and a few dozen ops in all instead
    of the tile sweep's hundred or more. At most six (N, N) buffers of ``P.acc`` and two boolean masks are
    alive at once (:func:`fastdml.dispatch.dense_sweep_bytes`).
    """
    x = P.x
    l2 = P.kind == "l2"
    q = _direct_q(x, P.rt())
    pc, pa, nc, na = q_intervals(iv, P.acc) if l2 else iv
    neg = P.y[:, None] == P.y[None, :]
    pos = neg.clone().fill_diagonal_(False)  # positives, the diagonal excluded
    neg.logical_not_()  # negatives (never the diagonal)
    d = q.sqrt() if l2 else q

    def row_sums(t):  # per-row sums in the accumulation dtype, the rows added in float64 (as the tiles do)
        return t.sum(1).sum(dtype=torch.float64)

    Aa = _interval_mask(q, pa).mul_(pos)
    sums[0] += torch.linalg.vecdot(Aa, d - pm, dim=1).sum(dtype=torch.float64)
    sums[1] += row_sums(Aa if pc == pa else _interval_mask(q, pc).mul_(pos))
    An = _interval_mask(q, na).mul_(neg)
    sums[2] -= torch.linalg.vecdot(An, d - nm, dim=1).sum(dtype=torch.float64)
    sums[3] += row_sums(An if nc == na else _interval_mask(q, nc).mul_(neg))
    del pos, neg
    if not need_grad:
        return
    # each pair stands for both orders: dt_ij/dx_i + dt_ji/dx_i = 2 dt_ij/dx_i; sql2 has dq/dx_i = 2 (x_i - x_j)
    scale = 4.0 if P.kind == "sql2" else 2.0
    zero = q == 0 if l2 else None  # d = 0: weight 0 (0/0 on the diagonal, A/0 at coincident points)
    diff = q  # q is spent: its buffer takes the coordinate differences
    for part, (A, sign) in enumerate(((Aa, 1.0), (An, -1.0))):
        if l2:
            A.div_(d).masked_fill_(zero, 0.0)
        for k in range(P.D):
            torch.sub(x[:, k : k + 1], x[None, :, k], out=diff)
            gx[part, :, k] += torch.linalg.vecdot(A, diff, dim=1) * (scale * sign)


# ------------------------------------------------------------------------------------------------------
# square case with the compiled tile: the tiles on and above the diagonal
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _native_bounds(iv, dtype, l2: bool) -> torch.Tensor:
    """The 8 interval ends the compiled tile compares m with (on q for l2), as a float64 tensor (never
    modified: shared by the calls with the same intervals)."""
    return torch.tensor([v for lo_hi in (q_intervals(iv, dtype) if l2 else iv) for v in lo_hi], dtype=torch.float64)


def _native_side(P: Problem, fixed: int) -> int:
    """Side of the compiled sweep's square tiles: three (side, side) buffers within the budget (the O(N D)
    parts beside them, as in :func:`_tile_side`), at most ``NATIVE_TILE``."""
    per = 3 * P.esize
    side = max(1, min(NATIVE_TILE, math.isqrt(max(1, budget.budget_bytes() // per)), P.N))
    if budget.peak_log is not None:
        budget.peak_log.append(side * side * per + int(fixed))
    return side


def _square_native(P, pm, nm, iv, need_grad, sums, gx, fixed) -> bool:
    """The square case with the compiled tile (``csrc/contrastive_tile.c``): False (nothing done) when the
    helpers are off or do not apply (small D: distances by direct differences).

    Tiles (I, J), J >= I, as in :func:`_square_tiles`: a diagonal tile is taken whole (its weights are
    symmetric: the row side counts twice), an off-diagonal one above its diagonal only, each entry for both
    orders (row side ``C X_J``, column side ``C^T X_I``). Per tile: one GEMM for the distances, one compiled
    pass for the terms, sums, counts and pair weights, then the gradient GEMMs: for each label run of at least
    ``DIRECT_RUN`` rows with an active positive in the tile, and for the negatives when one is active. The
    row-sum side ``rowsum(C) x_i`` is added once at the end.
    """
    if P.direct or not dispatch.native_helpers(P.device, P.acc):
        return False
    bounds = _native_bounds(iv, P.acc, P.kind == "l2")
    counts = torch.unique_consecutive(P.y, return_counts=True)[1]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    plo = torch.repeat_interleave(starts, counts)
    phi = torch.repeat_interleave(ends, counts)
    short = counts < DIRECT_RUN
    pdir = torch.repeat_interleave(short.to(torch.uint8), counts)
    long_runs = [(a, b) for a, b, s in zip(starts.tolist(), ends.tolist(), short.tolist()) if not s]
    long_ends = [b for _, b in long_runs]
    xn = P.xn if P.kind != "dot" else P.x.new_zeros(P.N)
    rs = torch.zeros((2, P.N), dtype=torch.float64, device=P.device) if need_grad else None
    near = 0.0 if P.kind == "dot" else NEAR_REL
    tile = native.contrastive_tiles(
        P.x, xn, plo, phi, pdir, P.kind, bounds, pm, nm, near, rs, gx if need_grad else None, sums
    )
    if tile is None:
        return False
    side = _native_side(P, fixed)
    work = _Work(3, side * side, P.acc, P.device)
    x, gp, gn = P.x, gx[0] if need_grad else None, gx[1] if need_grad else None
    # gradient scale of the weights: l2 c = 1/d', dot c = 1 (both orders: 2); sql2 dd'/dx = 2 (x_i - x_j)
    g = 4.0 if P.kind == "sql2" else 2.0
    tiles = list(budget.blocks(P.N, side))
    rows = [x[s:e] for s, e in tiles]
    cols = [r.t() for r in rows]
    views: dict = {}  # (h, w) -> the three buffers' views (at most four shapes)
    for t, (si, ei) in enumerate(tiles):
        for u in range(t, len(tiles)):
            sj, ej = tiles[u]
            diagonal = t == u
            shape = (ei - si, ej - sj)
            if shape not in views:
                views[shape] = work.views(*shape)
            v, cp, cn = views[shape]
            torch.mm(rows[t], cols[u], out=v)
            flags = tile(v, si, sj, cp, cn, diagonal)
            if flags & 2:
                # the label runs meeting the tile's rows and columns
                for k in range(bisect.bisect_right(long_ends, max(si, sj)), len(long_runs)):
                    r0, r1 = long_runs[k]
                    a0, a1, b0, b1 = max(r0, si), min(r1, ei), max(r0, sj), min(r1, ej)
                    if a0 >= a1:
                        break
                    if b0 < b1:
                        c = cp[a0 - si : a1 - si, b0 - sj : b1 - sj]
                        gp[a0:a1].addmm_(c, x[b0:b1], alpha=-g)
                        if not diagonal:
                            gp[b0:b1].addmm_(c.t(), x[a0:a1], alpha=-g)
            if flags & 1:
                gn[si:ei].addmm_(cn, rows[u], alpha=g)
                if not diagonal:
                    gn[sj:ej].addmm_(cn.t(), rows[t], alpha=g)
    if need_grad and P.kind != "dot":
        # the row-sum side: g (sum_j c_ij) x_i, negatives with the opposite sign
        rs[1].neg_()
        gx.addcmul_(rs.to(P.acc).unsqueeze(2), x.unsqueeze(0), value=g)
    return True

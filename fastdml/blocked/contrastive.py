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

Gradient in the forward: the pair weights go through the common GEMM-shaped pass (see :mod:`.distance`);
in the square case the weights are symmetric, so the column side equals the row side (added twice).
"""

from __future__ import annotations

import math

import torch

from . import budget
from .distance import Problem, distances, new_parts

INF = math.inf
# above this many label runs in a block, positives use a label mask over the block instead of rectangles
MAX_RECTS = 32


def _largest(guess: float, pred, dtype) -> float:
    """The largest float of ``dtype`` near ``guess`` where ``pred`` (true below a boundary) holds."""
    from .triplet import _boundary

    return float(_boundary(torch.tensor(guess, dtype=dtype), pred))


def _after(t: float, dtype) -> float:
    """The next float of ``dtype`` above t (so ``d <= t`` reads ``d < _after(t)``)."""
    return float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(INF, dtype=dtype)))


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


def _interval_mask(d: torch.Tensor, iv, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float mask ``lo < d < hi`` (1.0 / 0.0), comparisons written straight into a float tensor."""
    lo, hi = iv
    if out is None:
        out = torch.empty_like(d)
    if not lo < hi:
        return out.zero_()
    if hi != INF:
        torch.lt(d, hi, out=out)
        if lo != -INF:
            out.mul_(torch.gt(d, lo, out=torch.empty_like(d)))
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


def _excluded(P: Problem, s: int, e: int):
    """Excluded pairs of block rows s:e as (rows, cols) (block-relative rows), or None."""
    return P.excluded_cols(s, e)


def _grad_weights_side(P, C, xrows, rcols, gx_rows, gr_cols, sign, symmetric):
    """Add ``sign * (row side, column side)`` of the L2/sql2-form weights C (h, w) between rows ``xrows``
    (h, D) and references ``rcols`` (w, D): ``gx_rows += sign (rowsum(C) x - C R)``, and unless symmetric
    ``gr_cols += sign (colsum(C) r - C^T x)``; symmetric adds the row side twice instead."""
    row = torch.mm(C, rcols)
    row.neg_().addcmul_(C.sum(1, keepdim=True), xrows)
    gx_rows.add_(row, alpha=sign * (2.0 if symmetric else 1.0))
    if not symmetric:
        col = torch.mm(C.t(), xrows)
        col.neg_().addcmul_(C.sum(0).unsqueeze(1), rcols)
        gr_cols.add_(col, alpha=sign)


def _grad_dot_side(A, xrows, rcols, gx_rows, gr_cols, sign, symmetric):
    """d' = -x.r: pair weights ``sign * A``: ``gx_rows -= sign A R``, ``gr_cols -= sign A^T X``."""
    gx_rows.add_(torch.mm(A, rcols), alpha=-sign * (2.0 if symmetric else 1.0))
    if not symmetric:
        gr_cols.add_(torch.mm(A.t(), xrows), alpha=-sign)


def _branch_grad(P, s, e, A, d, c0, c1, rows_rel, gx_k, gr_k, sign, flagged_zero, symmetric):
    """Gradient of one branch on the sub-block rows ``rows_rel`` (block-relative slice) x cols c0:c1 with
    active mask A (modified in place). ``sign`` +1 for S+, -1 for S-."""
    r0, r1 = rows_rel
    xrows = P.x[s + r0 : s + r1]
    rcols = P.r[c0:c1]
    gx_rows = gx_k[s + r0 : s + r1]
    gr_cols = None if P.square else gr_k[c0:c1]
    if P.kind == "dot":
        _grad_dot_side(A, xrows, rcols, gx_rows, gr_cols, sign, symmetric)
        return
    if P.kind == "sql2":
        _grad_weights_side(P, A, xrows, rcols, gx_rows, gr_cols, 2.0 * sign, symmetric)
        return
    C = A.div_(d)
    # 0/0 on the diagonal and the flagged near-duplicates (handled by direct differences)
    flagged_zero(C)
    _grad_weights_side(P, C, xrows, rcols, gx_rows, gr_cols, sign, symmetric)


def _bytes_per_entry(P: Problem, need_grad: bool) -> int:
    # d, the negative mask/weights, a comparison temporary, the term temporary (+ slack for rectangles)
    return 7 * P.esize + 2


def contrastive_stats_fwd(x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high, need_grad):
    """``(stats, gx_parts, gr_parts)`` of the all-pairs contrastive loss (see the module docstring).

    ``stats`` float64 ``[S+, C+, S-, C-]``; ``gx_parts`` (2, N, D) = ``[dS+/dx, dS-/dx]`` and ``gr_parts``
    (2, M, D) likewise for r (rectangular case; (0, 0, D) in the square case, where gx holds row and
    column contributions); both empty (0, ., D) without ``need_grad``.
    """
    with torch.no_grad():
        P0 = Problem(x, y, r, z, excl, kind, "contrastive_stats_fwd")
        pm, nm = float(pos_margin), float(neg_margin)
        gx, gr = new_parts(P0, 2, need_grad)
        sums = torch.zeros(4, dtype=torch.float64, device=P0.device)
        iv = intervals(pm, nm, float(pos_lo), float(neg_hi), float(low), float(high), P0.acc)
        if P0.N == 0 or P0.M == 0 or iv is None:
            return sums, gx, gr
        P, rperm, cperm = P0.sorted_by_label()
        gxs, grs = new_parts(P, 2, need_grad)
        runs = _label_runs(P)
        fixed = (gx.numel() + gr.numel()) * P.esize  # the sorted copies of the parts
        rows = budget.rows_per_block(P.N, P.M, _bytes_per_entry(P, need_grad), fixed)
        for s, e in budget.blocks(P.N, rows):
            _block(P, s, e, pm, nm, iv, runs, need_grad, sums, gxs, grs)
        if need_grad:
            gx.index_copy_(1, rperm, gxs)
            if not P.square:
                gr.index_copy_(1, cperm, grs)
        return sums, gx, gr


def _block(P, s, e, pm, nm, iv, runs, need_grad, sums, gx, gr):
    pc, pa, nc, na = iv
    d, flagged = distances(P, s, e)
    b, m = d.shape
    symmetric = P.square
    rects = _rects(runs, s, e)
    ex = _excluded(P, s, e)
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
                _branch_grad(P, s, e, Aa, sub, c0, c1, (r0, r1), gx[0], None if P.square else gr[0], 1.0,
                             lambda C, r0=r0, c0=c0: zero_flagged_in(C, r0, c0), symmetric)
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
            _branch_grad(P, s, e, Aa, d, 0, m, (0, b), gx[0], None if P.square else gr[0], 1.0,
                         lambda C: zero_flagged_in(C, 0, 0), symmetric)
        del Aa

    # ---------------- negatives (the whole block, positives and excluded pairs zeroed)
    An = _interval_mask(d, na)
    Nc = An if nc == na else _interval_mask(d, nc)
    masks = [An] if Nc is An else [An, Nc]
    if use_rects:
        for r0, r1, c0, c1 in rects:
            for t in masks:
                t[r0:r1, c0:c1] = 0.0
    else:
        notsame = same.neg_().add_(1.0)  # (excluded pairs are zeroed just below)
        for t in masks:
            t.mul_(notsame)
        del same, notsame
    if ex is not None:
        for t in masks:
            t[ex] = 0.0
    sums[2] += torch.linalg.vecdot(An, torch.rsub(d, nm), dim=1).sum(dtype=torch.float64)
    sums[3] += Nc.sum(1).sum(dtype=torch.float64)
    del Nc, masks
    if need_grad:
        _branch_grad(P, s, e, An, d, 0, m, (0, b), gx[1], None if P.square else gr[1], -1.0,
                     lambda C: zero_flagged_in(C, 0, 0), symmetric)
        del An
        if fl is not None:
            _flagged_direct(P, s, fi, fj, d, pm, nm, pa, na, gx, gr, symmetric)


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


def _flagged_direct(P, s, fi, fj, d, pm, nm, pa, na, gx, gr, symmetric):
    """L2 gradient of the flagged near-duplicate pairs by direct differences: w / d (x_i - r_j), 0 at d = 0."""
    df = d[fi, fj]
    same = P.y[s + fi] == P.z[fj]
    valid = torch.ones_like(same)
    if not P.square and P.excl is not None:
        valid &= fj != P.excl[s + fi]
    wp = same & valid & _in_interval(df, pa)
    wn = (~same) & valid & _in_interval(df, na)
    inv = torch.where(df > 0, 1.0 / torch.where(df > 0, df, torch.ones_like(df)), torch.zeros_like(df))
    diff = P.x[s + fi] - P.r[fj]
    for k, (w, sign) in enumerate(((wp, 1.0), (wn, -1.0))):
        coef = (w.to(df.dtype) * inv * sign).unsqueeze(1)
        contrib = coef * diff
        gx[k].index_add_(0, s + fi, contrib, alpha=2.0 if symmetric else 1.0)
        if not symmetric:
            gr[k].index_add_(0, fj, contrib, alpha=-1.0)


def _in_interval(v, iv):
    lo, hi = iv
    out = torch.ones_like(v, dtype=torch.bool)
    if lo != -INF:
        out &= v > lo
    if hi != INF:
        out &= v < hi
    return out

"""Miners on the blocked CPU path: per-anchor extremes and the listing miners (PML's index tuples).

``row_extreme``: per block, the masked max/min along the row (torch.max/min along a dimension return the
first occurrence of the extreme, i.e. the lowest index on ties).

``pair_list`` / ``triplet_list``: the output is as large as it is and nothing else is. With one block (the
whole N x M problem within the budget) the lists are written directly; with several, a counting sweep
gives each anchor's count, an exclusive prefix sum gives its offset, and a second sweep writes every block
into its slice of the preallocated output. Within an anchor the triplets come out in (p, n) order, pairs
in row-major order: PML's order.
"""

from __future__ import annotations

import math

import torch

from . import budget
from .distance import Problem, distances
from .triplet import PositiveLayout, rank_bounds, thresholds

INF = math.inf


def row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op):
    """Per anchor i, the max or min of d'_ij over j in P(i) (``side="pos"``) or Q(i) (``"neg"``) with
    ``lo <= d'_ij <= hi`` and, when ``thr`` (N,) is given, ``d'_ij > thr_i`` (``thr_op="gt"``) or
    ``d'_ij < thr_i`` (``"lt"``).

    Returns ``(value (N,) in the accumulation dtype, index (N,) int64, found (N,) bool)``; ties go to the
    lowest index; value and index are 0 where nothing qualifies.
    """
    where = "row_extreme"
    if side not in ("pos", "neg"):
        raise ValueError(f"{where}: side must be 'pos' or 'neg', got {side!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"{where}: mode must be 'max' or 'min', got {mode!r}")
    if thr_op not in ("", "gt", "lt") or (thr is None) != (thr_op == ""):
        raise ValueError(f"{where}: thr_op must be 'gt' or 'lt' together with thr, or '' without; got {thr_op!r}")
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, where)
        lo, hi = float(lo), float(hi)
        if thr is not None:
            if not isinstance(thr, torch.Tensor) or thr.shape != (P.N,):
                raise ValueError(f"{where}: thr must be a tensor of shape ({P.N},), got {getattr(thr, 'shape', thr)}")
            thr = thr.detach().to(device=P.device, dtype=P.acc)
        value = torch.zeros(P.N, dtype=P.acc, device=P.device)
        index = torch.zeros(P.N, dtype=torch.int64, device=P.device)
        found = torch.zeros(P.N, dtype=torch.bool, device=P.device)
        if P.N == 0 or P.M == 0:
            return value, index, found
        rows = budget.rows_per_block(P.N, P.M, 4 * P.esize + 8)  # d, masks and comparison temporaries
        fill = -INF if mode == "max" else INF
        # without thresholds only the order matters: for l2 pick on q and take sqrt of the N winners
        order_only = P.kind == "l2" and lo == -INF and hi == INF and thr is None
        for s, e in budget.blocks(P.N, rows):
            d, _ = distances(P, s, e, root=not order_only)
            # every pair that is not a candidate gets the fill value (-inf for max, +inf for min), so the
            # row's max/min is a candidate's iff one exists (finite inputs)
            yb, zr = P.y[s:e, None], P.z[None, :]
            d.masked_fill_(torch.ne(yb, zr) if side == "pos" else torch.eq(yb, zr), fill)
            ex = P.excluded_cols(s, e)
            if ex is not None:
                d[ex] = fill
            if lo != -INF:
                d.masked_fill_(d < lo, fill)
            if hi != INF:
                d.masked_fill_(d > hi, fill)
            if thr is not None:
                t = thr[s:e, None]
                d.masked_fill_((d <= t) if thr_op == "gt" else (d >= t), fill)
            v, idx = d.max(1) if mode == "max" else d.min(1)
            f = v != fill
            if order_only:
                v = v.sqrt_()
            value[s:e] = v.masked_fill_(~f, 0.0)
            index[s:e] = idx.masked_fill_(~f, 0)
            found[s:e] = f
        return value, index, found


# ------------------------------------------------------------------------------------------------------
# pair_list
# ------------------------------------------------------------------------------------------------------
def _pair_masks(P, s, e, pos_lo, neg_hi):
    d, _ = distances(P, s, e)
    pos, neg = P.masks(s, e)
    if pos_lo != -INF:
        pos &= d > pos_lo
    if neg_hi != INF:
        neg &= d < neg_hi
    return pos, neg


def pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi):
    """``(a1, p, a2, n)`` int64: the positive pairs with ``d' > pos_lo`` and the negative pairs with
    ``d' < neg_hi``, each in row-major order (PML's ``torch.where`` order)."""
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, "pair_list")
        pos_lo, neg_hi = float(pos_lo), float(neg_hi)
        # per entry: d, 2 masks, comparisons, and the block's share of nonzero's output (worst case 2 x 16 B)
        rows = budget.rows_per_block(P.N, P.M, P.esize + 4 + 32)
        empty = torch.zeros(0, dtype=torch.int64, device=P.device)
        if P.N == 0 or P.M == 0:
            return empty, empty.clone(), empty.clone(), empty.clone()
        if rows >= P.N:
            pos, neg = _pair_masks(P, 0, P.N, pos_lo, neg_hi)
            a1, p = torch.nonzero(pos, as_tuple=True)
            a2, n = torch.nonzero(neg, as_tuple=True)
            return a1, p, a2, n
        # sweep 1: counts; sweep 2: write each block into its slice
        npos = npos_total = 0
        counts = []
        for s, e in budget.blocks(P.N, rows):
            pos, neg = _pair_masks(P, s, e, pos_lo, neg_hi)
            counts.append((int(pos.sum()), int(neg.sum())))
        npos_total = sum(c[0] for c in counts)
        nneg_total = sum(c[1] for c in counts)
        a1 = torch.empty(npos_total, dtype=torch.int64, device=P.device)
        p = torch.empty_like(a1)
        a2 = torch.empty(nneg_total, dtype=torch.int64, device=P.device)
        n = torch.empty_like(a2)
        npos = nneg = 0
        for (s, e), (cp, cn) in zip(budget.blocks(P.N, rows), counts):
            pos, neg = _pair_masks(P, s, e, pos_lo, neg_hi)
            if cp:
                ii, jj = torch.nonzero(pos, as_tuple=True)
                a1[npos : npos + cp] = ii + s
                p[npos : npos + cp] = jj
                npos += cp
            if cn:
                ii, jj = torch.nonzero(neg, as_tuple=True)
                a2[nneg : nneg + cn] = ii + s
                n[nneg : nneg + cn] = jj
                nneg += cn
        return a1, p, a2, n


# ------------------------------------------------------------------------------------------------------
# triplet_list
# ------------------------------------------------------------------------------------------------------
class _TripletBlock:
    """The rank ranges of one block: negative n of anchor i pairs with the positives of ranks [U, L)."""

    def __init__(self, P, layout, s, e, band_lo, band_hi):
        self.s, self.e = s, e
        self.kmax = layout.kmax(s, e)
        if self.kmax == 0:
            self.counts = torch.zeros(e - s, dtype=torch.int64, device=P.device)
            return
        d, _ = distances(P, s, e)
        _, neg = P.masks(s, e)
        self.gidx, self.pvalid, a = layout.gather(P, s, e, d, self.kmax)
        sa, sperm = torch.sort(a, dim=1)
        kv = self.pvalid.sum(1)
        lowers = [thresholds(sa, ("t_gt", band_lo), 0.0)] if band_lo != -INF else []
        uppers = [thresholds(sa, ("t_le", band_hi), 0.0)] if band_hi != INF else []
        U, L = rank_bounds(sa, kv, d, lowers, uppers)
        del d, sa
        # negatives with an empty range get U = L = 0 (so they select nothing)
        empty = ~neg | (U >= L)
        self.U = U.masked_fill_(empty, 0)
        self.L = L.masked_fill(empty, 0)
        self.counts = (self.L - self.U).sum(1)
        ar = torch.arange(self.kmax, device=P.device).expand(e - s, self.kmax)
        self.rank = torch.empty_like(sperm).scatter_(1, sperm, ar)  # rank of each slot

    def write(self, P, out, offset, chunk_limit):
        """Write this block's triplets into out (a, p, n) from ``offset``; returns the new offset."""
        if self.kmax == 0:
            return offset
        b = self.e - self.s
        # per anchor: the (Kmax, M) boolean block and its comparisons, plus 3 x 2 int64 per triplet written
        costs = torch.full((b,), self.kmax * P.M * 4, dtype=torch.int64, device=P.device) + 48 * self.counts
        for cs, ce in budget.chunk_bounds(costs.cpu(), chunk_limit):
            rk = self.rank[cs:ce, :, None]
            # (invalid slots have rank >= kv >= L: never selected)
            sel = rk >= self.U[cs:ce, None, :]
            sel &= rk < self.L[cs:ce, None, :]
            ii, ss, nn = torch.nonzero(sel, as_tuple=True)
            del sel
            t = ii.numel()
            a_out, p_out, n_out = out
            a_out[offset : offset + t] = ii + (self.s + cs)
            p_out[offset : offset + t] = self.gidx[cs:ce][ii, ss]
            n_out[offset : offset + t] = nn
            offset += t
        return offset


def triplet_list(x, y, r, z, excl, kind, band_lo, band_hi):
    """All triplets ``(a, p, n)`` (int64) with p in P(a), n in Q(a) and ``band_lo < d'_an - d'_ap <= band_hi``,
    in PML's lexicographic (a, p, n) order.

    Per block: the sorted positives turn the band into a rank range ``[U_n, L_n)`` per negative (see
    :mod:`.triplet`); counts are ``sum_n (L_n - U_n)``; the write expands the ranges chunk by chunk.
    """
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, "triplet_list")
        band_lo, band_hi = float(band_lo), float(band_hi)
        empty = torch.zeros(0, dtype=torch.int64, device=P.device)
        if P.N == 0 or P.M == 0 or band_lo >= band_hi:
            return empty, empty.clone(), empty.clone()
        layout = PositiveLayout(P)
        # block state: d, U, L, masks, rank ranges (int64) ~ 5 x 8 B per entry; half the budget, the other
        # half is for the write chunks
        half = budget.budget_bytes() // 2
        rows = budget.rows_per_block(P.N, P.M, P.esize + 48, half)
        nblocks = (P.N + rows - 1) // rows
        if nblocks == 1:
            blk = _TripletBlock(P, layout, 0, P.N, band_lo, band_hi)
            total = int(blk.counts.sum())
            out = tuple(torch.empty(total, dtype=torch.int64, device=P.device) for _ in range(3))
            blk.write(P, out, 0, half)
            return out
        counts = torch.zeros(P.N, dtype=torch.int64, device=P.device)
        for s, e in budget.blocks(P.N, rows):
            counts[s:e] = _TripletBlock(P, layout, s, e, band_lo, band_hi).counts
        total = int(counts.sum())
        out = tuple(torch.empty(total, dtype=torch.int64, device=P.device) for _ in range(3))
        offsets = torch.cumsum(counts, 0) - counts  # exclusive prefix sum
        for s, e in budget.blocks(P.N, rows):
            blk = _TripletBlock(P, layout, s, e, band_lo, band_hi)
            end = blk.write(P, out, int(offsets[s]), half)
            assert end == int(offsets[s]) + int(counts[s:e].sum())
        return out

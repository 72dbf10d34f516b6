"""Batch-hard mining in one sweep on the blocked CPU path: ``row_hardest``.

Per anchor i, in one pass over the (N, M) distances::

    pos: max_{j in P(i)} d'_ij   (the farthest positive)
    neg: min_{j in Q(i)} d'_ij   (the nearest negative)

with their indices (ties: the lowest index) and ``found`` flags; the same as ``row_extreme("pos", "max")``
and ``row_extreme("neg", "min")`` without band or thresholds, but with one GEMM per block instead of two.

Two sweeps, the same picks. Per block of rows the GEMM writes the scores ``t (b, M)`` (below); then

* the compiled row scan (:mod:`.native`, when it is built; the default): one pass over each row comparing
  its label with every column's, keeping the first maximum over the positives and the first minimum over the
  negatives, skipping the excluded column. In the square case (x against itself, D > 4, no exact duplicate
  rows) only the upper triangle is computed: block [s, e) of rows against the rows from s on, each entry
  serving both anchors (:func:`_sweep_native_square`; 75% of the GEMM at two blocks, 56% at eight). A NaN
  score sends the whole call to the torch ops (they propagate NaN). Figures in bench/RESULTS.md;
* otherwise torch ops, laid out as follows.

Layout. The columns are sorted by label (stably: within a label, original order), so the positives of anchor
i are the run ``cperm[c0_i : c0_i + cnt_i]`` of original column numbers, increasing. Nothing is permuted in
memory: per block of rows the GEMM writes ``t (b, M)`` in the original column order, the positives are
*gathered* through those column numbers into a small ``(b, K)`` tensor (K = largest class), and then
*scattered* back as ``+inf`` so the row minimum of ``t`` runs over the negatives only. No (b, M) mask is
built. Ties: ``torch.max``/``torch.min`` along a dimension return the first extreme; the gathered positives
are in increasing original column order (a row with fewer than K positives repeats its last one, after it)
and ``t`` is in original order, so the first extreme is the lowest original index.

Score ``t`` per kind (picking on it picks the same pair as on d'):

* ``"l2"``/``"sql2"``: ``t = |r_j|^2 - 2 x_i.r_j`` (one GEMM, ``addmm`` onto the broadcast norms): q minus the
  row constant ``|x_i|^2``, which is added to the N winners only; sqrt is monotone, so for l2 only the N
  winners are rooted. D <= 4: q by direct differences (exact).
* ``"dot"``: ``t = x.(-r) = d'`` exactly (negation is exact; the same GEMM as ``distances``).

Precision. The expansion's error is ~eps (|x|^2 + |r|^2). A row whose chosen q is a near-duplicate
(``q <= NEAR_REL (|x_i|^2 + max |r|^2)``, the pre-check of :func:`.distance.distances`) may have picked the
wrong pair among nearly equal small values, so it is re-decided over its whole row by direct differences
(exact; rare). Elsewhere the candidates' relative error is below ~100 D eps. References with exact duplicate
rows have their columns copied from the first copy (:func:`.distance.canonical_columns`), so copies tie
exactly and the lowest index wins, as in the reference.

Memory: one (b, M) score block (about ``TARGET_BLOCK_BYTES`` per thread: L2-resident), the (b, K) gathered
positives and their column numbers, within ``fastdml.config.memory_budget``.
"""

from __future__ import annotations

import math

import torch

from .. import dispatch
from . import budget, native
from .distance import NEAR_REL, Problem, _direct_q, canonical_columns

INF = math.inf
# score block size per intra-op thread: it stays in the core's cache between the GEMM and the reductions and
# keeps the peak memory low; smaller blocks add per-op overhead (the trade-off is in bench/RESULTS.md)
TARGET_BLOCK_BYTES = 1 << 20


class _PositiveColumns:
    """The positive columns of each anchor as a (b, K) index tensor (original column numbers, increasing).

    The columns sorted stably by label form runs; anchor i's positives are the run of its label
    (``cnt_i`` columns; ``K = max cnt``). A row with fewer than K positives repeats its last positive (after
    it, so the first extreme is still the lowest index); a row without any points at an arbitrary column
    (``cnt_i = 0``; the caller ignores it). Rows of one label share their columns, so a (runs, K) table is
    built once and a block's rows are copied out of it (``index_select``: row copies), when it is small.
    """

    def __init__(self, P: Problem):
        dev = P.device
        zs, self.cperm = torch.sort(P.z, stable=True)
        if P.square:
            # every anchor's label is present: its run is its sorted position's run, scattered back
            labels, inverse, counts = torch.unique_consecutive(zs, return_inverse=True, return_counts=True)
            run = torch.empty_like(inverse).scatter_(0, self.cperm, inverse)
            self.cnt = counts.index_select(0, run)
            self.some_empty = False
        else:
            labels, counts = torch.unique_consecutive(zs, return_counts=True)
            run = torch.searchsorted(labels, P.y).clamp_max_(labels.numel() - 1)
            present = labels.index_select(0, run) == P.y
            self.cnt = torch.where(present, counts.index_select(0, run), 0)
            self.some_empty = not bool(present.all())
        starts = torch.cumsum(counts, 0) - counts
        R = labels.numel()
        self.K = int(self.cnt.max()) if self.cnt.numel() else 0
        self.run = run
        self.slot = torch.arange(self.K, device=dev)
        self.starts, self.counts = starts, counts
        self.table = None
        if R * self.K * 8 <= TARGET_BLOCK_BYTES:
            self.table = self._expand(starts, counts)

    def _expand(self, starts, counts):
        idx = starts[:, None] + torch.minimum(self.slot, (counts - 1)[:, None])
        return self.cperm.index_select(0, idx.view(-1)).view(idx.shape)

    def __call__(self, s: int, e: int) -> torch.Tensor:
        run = self.run[s:e]
        if self.table is not None:
            return self.table.index_select(0, run)
        return self._expand(self.starts.index_select(0, run), self.counts.index_select(0, run))


# reductions of a row run over chunks of this many columns (see _first_min)
_CHUNK = 64


def _first_min(t: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> None:
    """Row minimum of ``t`` (b, M) and its first index, written into ``value``/``index`` (b,).

    ``torch.min(dim)`` (value and index) is a scalar loop on the CPU, much slower than ``amin``. So: chunk
    minima with ``amin`` (vectorized, one pass), the first chunk holding the row minimum (``min`` over M/64
    entries), then the first position inside that chunk (``min`` over 64 entries). A tail of fewer than 64
    columns wins only if strictly smaller (it lies after every chunk)."""
    b, m = t.shape
    mc = m - m % _CHUNK
    if mc == 0:
        torch.min(t, 1, out=(value, index))
        return
    g = mc // _CHUNK
    blocks = t[:, :mc].view(b, g, _CHUNK)
    cv, ci = blocks.amin(2).min(1)
    if mc == m and t.is_contiguous():
        # the winning chunk of each row as a row copy (index_select: much faster than an element gather)
        first = torch.arange(0, b * g, g, device=t.device).add_(ci)
        inner = t.view(b * g, _CHUNK).index_select(0, first).min(1).indices
    else:
        inner = blocks[torch.arange(b, device=t.device), ci].argmin(1)
    idx = ci.mul_(_CHUNK).add_(inner)
    if mc < m:
        tv, ti = t[:, mc:].min(1)
        tail = tv < cv
        cv = torch.where(tail, tv, cv)
        idx = torch.where(tail, ti + mc, idx)
    value.copy_(cv)
    index.copy_(idx)


def _score_aux(P: Problem) -> torch.Tensor:
    """What :func:`_score_block` adds to the GEMM: ``-r`` (dot: t = x.(-r) = d' exactly), else the norms
    ``|r|^2`` as a row (l2/sql2: t = |r|^2 - 2 x.r, q without the row constant |x_i|^2)."""
    return -P.r if P.kind == "dot" else P.rn[None, :]


def _score_block(P: Problem, s: int, e: int, aux: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The (b, M) scores of rows s:e: ``x.(-r)`` (dot; ``aux = -r``), ``|r|^2 - 2 x.r`` (l2/sql2; ``aux`` =
    the norms as a row, one GEMM accumulating onto them), or q by direct differences (D <= 4). ``out``: the
    (b, M) block buffer, reused from block to block (fresh memory costs a page fault per 4 kB page)."""
    if P.kind == "dot":
        return torch.mm(P.x[s:e], aux.t(), out=out)
    if P.direct:
        return _direct_q(P.x[s:e], P.rt())
    return torch.addmm(aux, P.x[s:e], P.r.t(), alpha=-2.0, out=out)


def _exact_rows(P: Problem, rows: torch.Tensor, out) -> None:
    """Re-decide ``rows`` (original row numbers) exactly: q by direct differences over the whole row, then the
    masked max over the positives and min over the negatives (first extreme: lowest index). Writes into
    ``out = (pv, pi, pf, nv, ni, nf)``."""
    pv, pi, pf, nv, ni, nf = out
    # a chunk holds its (c, M, D) differences and a few (c, M) temporaries: a quarter of the budget
    per_row = P.M * (P.D + 4) * P.esize
    chunk = max(1, budget.budget_bytes() // (4 * per_row))
    for c in range(0, rows.numel(), chunk):
        rr = rows[c : c + chunk]
        diff = P.x[rr][:, None, :] - P.r[None, :, :]
        q = (diff * diff).sum(2)
        del diff
        same = P.y[rr][:, None] == P.z[None, :]
        ex = torch.zeros_like(same)
        if P.square:
            ex[torch.arange(rr.numel(), device=P.device), rr] = True
        elif P.excl is not None:
            e = P.excl[rr]
            k = torch.nonzero(e >= 0).flatten()
            ex[k, e[k]] = True
        v, i = torch.where(same & ~ex, q, -INF).max(1)
        pv[rr], pi[rr], pf[rr] = v, i, v != -INF
        v, i = torch.where(~same & ~ex, q, INF).min(1)
        nv[rr], ni[rr], nf[rr] = v, i, v != INF


def _block_rows(P: Problem, per_entry: float) -> int:
    """Rows per score block: within the memory budget, and about ``TARGET_BLOCK_BYTES`` per thread."""
    rows = budget.rows_per_block(P.N, P.M, per_entry)
    target = TARGET_BLOCK_BYTES * max(1, torch.get_num_threads())
    return max(1, min(rows, target // max(1, P.M * P.esize)))


def _sweep_native(P: Problem, canon, out) -> bool:
    """Every block's extremes by the compiled row scan (:mod:`.native`: one pass over the block). Returns
    False when the scan is not available, or when a kept score is NaN (torch's max/min propagate NaN, the scan
    would skip it): then :func:`_sweep_torch` redoes the whole call. Rows without a positive keep
    ``pv = -inf`` (found = False)."""
    if P.M >= 2**31 or not dispatch.native_helpers(P.device, P.acc):
        return False
    if _square_strips(P, canon):
        return _sweep_native_square(P, out)
    pv, pi, _, nv, ni, _ = out
    aux = _score_aux(P)
    y, z = native.label_codes(P.y, P.z, P.acc)
    excl = None
    if not P.square:
        excl = P.excl if P.excl is not None else torch.full((P.N,), -1, dtype=torch.int64)
    # per entry: the score block and its canonical copy (duplicates only)
    rows = _block_rows(P, P.esize * (2 if canon is not None else 1))
    block_buf = torch.empty(rows * P.M, dtype=P.acc)
    for s, e in budget.blocks(P.N, rows):
        t = _score_block(P, s, e, aux, block_buf[: (e - s) * P.M].view(e - s, P.M))
        if canon is not None:
            t = t.index_select(1, canon)
        ex = None if excl is None else excl[s:e]
        diag = s if P.square else -1
        if not native.row_hardest_scan(t.contiguous(), y[s:e], z, ex, diag, pv[s:e], pi[s:e], nv[s:e], ni[s:e]):
            for o in out:
                o.zero_()  # (the torch sweep writes only what it needs)
            return False
    return True


def _square_strips(P: Problem, canon) -> bool:
    """Whether the compiled sweep takes the square case's upper triangle (:func:`_sweep_native_square`):
    not with exact duplicate rows (their columns are copied from the first copy, a row-block step) nor for
    small D (direct differences, no GEMM)."""
    return P.square and canon is None and not P.direct


def _sweep_native_square(P: Problem, out) -> bool:
    """The square case over the upper triangle only (x_i . x_j = x_j . x_i): per block of rows [s, e) one
    GEMM against the rows from s on, ``G = x[s:e] x[s:]^T``, and one pass of the compiled strip scan
    (:func:`.native.row_hardest_strip`), which reads each entry for both anchors. About three quarters of
    the full GEMM at two blocks, less with more. Returns False when the scan declines (as
    :func:`_sweep_native`)."""
    N = P.N
    pv, pi, _, nv, ni, _ = out
    y = native.label_codes(P.y, P.y[:0], P.acc)[0]
    idt = native.index_dtype(P.acc)
    bp = torch.full((N,), -INF, dtype=P.acc)
    bn = torch.full((N,), INF, dtype=P.acc)
    bpi = torch.full((N,), N, dtype=idt)
    bni = torch.full((N,), N, dtype=idt)
    # score = off_c + scale x_a . x_c: |x_c|^2 - 2 x_a . x_c (l2/sql2, q without |x_a|^2), or -x_a . x_c (dot)
    off, scale = (torch.zeros(N, dtype=P.acc), -1.0) if P.kind == "dot" else (P.xn.contiguous(), -2.0)
    rows = _block_rows(P, P.esize)
    block_buf = torch.empty(rows * N, dtype=P.acc)
    for s, e in budget.blocks(N, rows):
        G = torch.mm(P.x[s:e], P.x[s:].t(), out=block_buf[: (e - s) * (N - s)].view(e - s, N - s))
        if not native.row_hardest_strip(G, s, off, scale, y, bp, bpi, bn, bni):
            return False
    pv.copy_(bp)
    pi.copy_(bpi)
    nv.copy_(bn)
    ni.copy_(bni)
    return True


def _sweep_torch(P: Problem, canon, out) -> torch.Tensor:
    """Every block's extremes by torch ops (see the module docstring: gather the positives, scatter +inf over
    them, first row minimum). Returns the rows that have a positive (the others' ``pv`` is arbitrary)."""
    N, M, dev = P.N, P.M, P.device
    pv, pi, pf, nv, ni, nf = out
    aux = _score_aux(P)
    cols_of = _PositiveColumns(P)
    K = cols_of.K
    # rows without any positive (rectangular only) must not fill +inf onto a negative
    some_empty = K > 0 and cols_of.some_empty
    esize = P.esize
    # per entry: the score block, its canonical copy (duplicates only); per positive slot: value,
    # column number, flat index
    rows = _block_rows(P, esize * (2 if canon is not None else 1) + (K / M) * (esize + 16))
    rowbase = torch.arange(0, rows * M, M, device=dev)[:, None]
    block_buf = torch.empty(rows * M, dtype=P.acc, device=dev)
    for s, e in budget.blocks(N, rows):
        t = _score_block(P, s, e, aux, block_buf[: (e - s) * M].view(e - s, M))
        if canon is not None:
            t = t.index_select(1, canon)
        ex = t.diagonal(s) if P.square else P.excluded_cols(s, e)
        if K > 0:
            # excluded pairs never win the positive max (square: the diagonal is a positive)
            if P.square:
                ex.fill_(-INF)
            elif ex is not None:
                t[ex] = -INF
            cols = cols_of(s, e)
            g = t.gather(1, cols)
            k = torch.empty(e - s, dtype=torch.int64, device=dev)
            torch.max(g, 1, out=(pv[s:e], k))
            torch.gather(cols, 1, k[:, None], out=pi[s:e, None])
            if some_empty:
                # a row without positives points at some negative: write its own values back
                t.scatter_(1, cols, torch.where(cols_of.cnt[s:e, None] > 0, INF, g))
            else:
                del g  # (peak memory: the block's temporaries are the score block and one (b, K) index)
                t.view(-1).index_fill_(0, cols.add_(rowbase[: e - s]).view(-1), INF)  # flat positions
        if P.square:
            ex.fill_(INF)
        elif ex is not None:
            t[ex] = INF
        _first_min(t, nv[s:e], ni[s:e])
    return cols_of.cnt > 0


def row_hardest(x, y, r, z, excl, kind):
    """Per anchor i the farthest positive and the nearest negative:
    ``pos = max_{j in P(i)} d'_ij``, ``neg = min_{j in Q(i)} d'_ij`` (square case: j != i; rectangular:
    j != excl_i), ties to the lowest index.

    Returns ``(pos_value, pos_index, pos_found, neg_value, neg_index, neg_found)``: values (N,) in the
    accumulation dtype (float64 for float64 inputs, else float32), indices (N,) int64, found (N,) bool;
    value and index are 0 where an anchor has no positive (negative). No gradient.
    """
    with torch.no_grad():
        P = Problem(x, y, r, z, excl, kind, "row_hardest")
        N, M, dev = P.N, P.M, P.device
        pv = torch.zeros(N, dtype=P.acc, device=dev)
        nv = torch.zeros(N, dtype=P.acc, device=dev)
        pi = torch.zeros(N, dtype=torch.int64, device=dev)
        ni = torch.zeros(N, dtype=torch.int64, device=dev)
        pf = torch.zeros(N, dtype=torch.bool, device=dev)
        nf = torch.zeros(N, dtype=torch.bool, device=dev)
        out = (pv, pi, pf, nv, ni, nf)
        if N == 0 or M == 0:
            return out
        canon = canonical_columns(P)
        # the compiled scan when it is there, else (or after a NaN score) the torch ops; the same results
        has_pos = None if _sweep_native(P, canon, out) else _sweep_torch(P, canon, out)
        torch.ne(pv, -INF, out=pf)
        if has_pos is not None:
            pf &= has_pos
        torch.ne(nv, INF, out=nf)
        if P.kind != "dot" and not P.direct:
            pv.add_(P.xn)  # q = t + |x_i|^2 for the winners only
            nv.add_(P.xn)
            thr = NEAR_REL * (P.xn + P.rn_max)
            near = torch.nonzero((pf & (pv <= thr)) | (nf & (nv <= thr))).flatten()
            if near.numel():
                _exact_rows(P, near, out)
        if P.kind == "l2":
            pv.clamp_min_(0).sqrt_()
            nv.clamp_min_(0).sqrt_()
        pv.masked_fill_(~pf, 0.0)
        pi.masked_fill_(~pf, 0)
        nv.masked_fill_(~nf, 0.0)
        ni.masked_fill_(~nf, 0)
        return out

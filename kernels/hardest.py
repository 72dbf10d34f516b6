"""Batch-hard mining in one sweep on the Triton path: ``row_hardest``.

Per query i::

    pos: max_{j in P(i)} d'_ij   (farthest positive)        neg: min_{j in Q(i)} d'_ij   (nearest negative)

each with its index (ties: the lowest) and a found flag (value and index 0 where none): the results of
``row_extreme(..., "pos", "max")`` and ``row_extreme(..., "neg", "min")`` (no band, no threshold) from one
sweep over the distance tiles instead of two.

One program owns a block of query rows and sweeps the column tiles in increasing order; every d' tile
(the same ``dprime_tile`` as ``row_extreme``: near-duplicates recomputed by direct differences) feeds both
running extremes, kept in registers. Strict comparisons across tiles keep the earlier (lower) index on
ties; inside a tile the lowest index among the entries equal to the tile's extreme is taken. Deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import extreme_config, extreme_outputs, labelled_tile, precision, prepare, query_rows, running_extreme


@triton.jit(do_not_specialize=["N", "M"])
def row_hardest_kernel(
    x_ptr,
    r_ptr,
    xn_ptr,
    rn_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    pval_ptr,
    pidx_ptr,
    pfound_ptr,
    nval_ptr,
    nidx_ptr,
    nfound_ptr,
    N,
    M,
    D,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows, rmask, yl, ex = query_rows(tl.program_id(0), N, y_ptr, excl_ptr, BM)
    pbest = tl.full((BM,), float("-inf"), tl.float32)
    nbest = tl.full((BM,), float("inf"), tl.float32)
    pidx = tl.zeros((BM,), tl.int64)
    nidx = tl.zeros((BM,), tl.int64)
    pfound = rows < 0
    nfound = rows < 0
    for j0 in range(0, M, BN):
        cols, dp, ok, same = labelled_tile(
            x_ptr, r_ptr, xn_ptr, rn_ptr, z_ptr, rows, rmask, yl, ex, j0, M, D, KIND, BM, BN, BK, SUBK, PREC, UPCAST
        )
        # the farthest positive and the nearest negative
        pbest, pidx, pfound = running_extreme(ok & same, dp, cols, pbest, pidx, pfound, M, True)
        nbest, nidx, nfound = running_extreme(ok & (~same), dp, cols, nbest, nidx, nfound, M, False)
    tl.store(pval_ptr + rows, tl.where(pfound, pbest, 0.0), mask=rmask)
    tl.store(pidx_ptr + rows, tl.where(pfound, pidx, 0), mask=rmask)
    tl.store(pfound_ptr + rows, pfound.to(tl.int8), mask=rmask)
    tl.store(nval_ptr + rows, tl.where(nfound, nbest, 0.0), mask=rmask)
    tl.store(nidx_ptr + rows, tl.where(nfound, nidx, 0), mask=rmask)
    tl.store(nfound_ptr + rows, nfound.to(tl.int8), mask=rmask)


def row_hardest(x, y, r, z, excl, kind, allow_tf32=False):
    """``(pos_value f32, pos_index i64, pos_found bool, neg_value f32, neg_index i64, neg_found bool)``: per
    query the farthest positive and the nearest negative (see the module docstring)."""
    p = prepare(x, y, r, z, excl, kind)
    outs = extreme_outputs(p.n, p.device) + extreme_outputs(p.n, p.device)
    if p.n > 0:
        cfg = extreme_config(p.d)
        row_hardest_kernel[(triton.cdiv(p.n, cfg["BM"]),)](
            p.x,
            p.r,
            p.xn,
            p.rn,
            p.y,
            p.z,
            p.excl,
            *outs,
            p.n,
            p.m,
            p.d,
            KIND=p.kind_id,
            PREC=precision(allow_tf32),
            UPCAST=p.upcast,
            **cfg,
        )
    pv, pi, pf, nv, ni, nf = outs
    return pv, pi, pf == 1, nv, ni, nf == 1

"""Batch-hard mining in one sweep on the Triton path: ``row_hardest``.

Per query i::

    pos: max_{j in P(i)} d'_ij   (farthest positive)        neg: min_{j in Q(i)} d'_ij   (nearest negative)

each with its index (ties: the lowest) and a found flag (value and index 0 where none): the results of
``row_extreme(..., "pos", "max")`` and ``row_extreme(..., "neg", "min")`` (no band, no threshold) from one
sweep over the distance tiles instead of two.

One program owns a block of query rows and sweeps the column tiles in increasing order; every d' tile
(the same ``dprime_tile`` as ``row_extreme``: near-duplicates recomputed by direct differences) feeds both
running extremes, kept in registers. Strict comparisons across tiles keep the earlier (lower) index on
ties; inside a tile the lowest index among the entries equal to the tile's extreme is taken. To fill the
GPU when there are few row blocks, the columns are cut into contiguous ranges (``_common.column_split``),
one program per (row block, range), and the per-range (value, index, found) partials are merged in a small
torch pass (``merge_extremes``: ties to the earliest range, i.e. the lowest index). No atomics;
deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    autotuned,
    column_split,
    device_guard,
    extreme_configs,
    extreme_outputs,
    labelled_tile,
    merge_extremes,
    near_fraction,
    precision,
    prepare,
    query_rows,
    running_extreme,
    tune_key,
)


@triton.jit(do_not_specialize=["N", "M", "SPAN"])
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
    SPAN,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    NEAR: tl.constexpr,
):
    rows, rmask, yl, ex = query_rows(tl.program_id(0), N, y_ptr, excl_ptr, BM)
    c0 = tl.program_id(1).to(tl.int64) * SPAN
    c1 = tl.minimum(c0 + SPAN, M)
    out = tl.program_id(1).to(tl.int64) * N + rows  # this column range's row of the (splits, N) partials
    pbest = tl.full((BM,), float("-inf"), tl.float32)
    nbest = tl.full((BM,), float("inf"), tl.float32)
    pidx = tl.zeros((BM,), tl.int64)
    nidx = tl.zeros((BM,), tl.int64)
    pfound = rows < 0
    nfound = rows < 0
    for j0 in range(c0, c1, BN):
        cols, dp, ok, same = labelled_tile(
            x_ptr,
            r_ptr,
            xn_ptr,
            rn_ptr,
            z_ptr,
            rows,
            rmask,
            yl,
            ex,
            j0,
            c1,
            D,
            KIND,
            BM,
            BN,
            BK,
            SUBK,
            PREC,
            UPCAST,
            NEAR,
        )
        # the farthest positive and the nearest negative
        pbest, pidx, pfound = running_extreme(ok & same, dp, cols, pbest, pidx, pfound, c1, True)
        nbest, nidx, nfound = running_extreme(ok & (~same), dp, cols, nbest, nidx, nfound, c1, False)
    tl.store(pval_ptr + out, tl.where(pfound, pbest, 0.0), mask=rmask)
    tl.store(pidx_ptr + out, tl.where(pfound, pidx, 0), mask=rmask)
    tl.store(pfound_ptr + out, pfound.to(tl.int8), mask=rmask)
    tl.store(nval_ptr + out, tl.where(nfound, nbest, 0.0), mask=rmask)
    tl.store(nidx_ptr + out, tl.where(nfound, nidx, 0), mask=rmask)
    tl.store(nfound_ptr + out, nfound.to(tl.int8), mask=rmask)


def row_hardest(x, y, r, z, excl, kind, allow_tf32=None):
    """``(pos_value f32, pos_index i64, pos_found bool, neg_value f32, neg_index i64, neg_found bool)``: per
    query the farthest positive and the nearest negative (see the module docstring). ``allow_tf32``: None
    follows ``fastdml.config.fp32_precision()``, True/False force tf32/ieee."""
    p = prepare(x, y, r, z, excl, kind)
    if p.n == 0:
        return merge_extremes(*extreme_outputs(0, p.device), True) + merge_extremes(
            *extreme_outputs(0, p.device), False
        )
    prec = precision(allow_tf32)

    def run(cfg):
        rows = triton.cdiv(p.n, cfg["BM"])
        splits, span = column_split(rows, p.m, cfg["BN"], p.device)
        pos = extreme_outputs(p.n, p.device, splits)
        neg = extreme_outputs(p.n, p.device, splits)
        with device_guard(p.device):
            row_hardest_kernel[(rows, splits)](
                p.x,
                p.r,
                p.xn,
                p.rn,
                p.y,
                p.z,
                p.excl,
                *pos,
                *neg,
                p.n,
                p.m,
                p.d,
                span,
                KIND=p.kind_id,
                PREC=prec,
                UPCAST=p.upcast,
                NEAR=near_fraction(prec),
                **cfg,
            )
        return pos, neg

    cfg = autotuned(tune_key("row_hardest", p, prec), extreme_configs(p.d, p.x.dtype, prec), run, p.device)
    pos, neg = run(cfg)
    return merge_extremes(*pos, True) + merge_extremes(*neg, False)

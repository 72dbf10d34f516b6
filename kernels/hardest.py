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

import torch
import triton
import triton.language as tl

from ._common import block_d, interpreting, labelled_tile, poison, precision, prepare


@triton.jit(do_not_specialize=["N", "M"])
def row_hardest_kernel(
    x_ptr, r_ptr, xn_ptr, rn_ptr, y_ptr, z_ptr, excl_ptr,
    pval_ptr, pidx_ptr, pfound_ptr, nval_ptr, nidx_ptr, nfound_ptr,
    N, M, D,
    KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SUBK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N
    yl = tl.load(y_ptr + rows, mask=rmask, other=0)
    ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    pbest = tl.full((BM,), float("-inf"), tl.float32)
    nbest = tl.full((BM,), float("inf"), tl.float32)
    pidx = tl.zeros((BM,), tl.int64)
    nidx = tl.zeros((BM,), tl.int64)
    pfound = rows < 0
    nfound = rows < 0
    for j0 in range(0, M, BN):
        cols, dp, ok, same = labelled_tile(x_ptr, r_ptr, xn_ptr, rn_ptr, z_ptr, rows, rmask, yl, ex, j0, M, D,
                                              KIND, BM, BN, BK, SUBK, PREC, UPCAST)
        pok = ok & same
        nok = ok & (~same)
        # farthest positive
        pany = tl.max(pok.to(tl.int32), axis=1) > 0
        pm = tl.max(tl.where(pok, dp, float("-inf")), axis=1)
        pbetter = pany & ((~pfound) | (pm > pbest))
        pat = tl.min(tl.where(pok & (dp == pm[:, None]), cols[None, :], M), axis=1)
        pbest = tl.where(pbetter, pm, pbest)
        pidx = tl.where(pbetter, pat, pidx)
        pfound = pfound | pany
        # nearest negative
        nany = tl.max(nok.to(tl.int32), axis=1) > 0
        nm = tl.min(tl.where(nok, dp, float("inf")), axis=1)
        nbetter = nany & ((~nfound) | (nm < nbest))
        nat = tl.min(tl.where(nok & (dp == nm[:, None]), cols[None, :], M), axis=1)
        nbest = tl.where(nbetter, nm, nbest)
        nidx = tl.where(nbetter, nat, nidx)
        nfound = nfound | nany
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
    outs = []
    for _ in range(2):
        outs += [
            poison((p.n,), p.device),
            torch.full((p.n,), -1, device=p.device, dtype=torch.int64),
            torch.full((p.n,), 2, device=p.device, dtype=torch.int8),
        ]
    if p.n > 0:
        if interpreting():
            cfg = dict(BM=32, BN=32, BK=block_d(p.d), SUBK=16, num_warps=4)
        else:
            # 8 warps: with 4 the (64, 32) tile needs > 255 registers and spills on sm_90 (compile_check)
            cfg = dict(BM=64, BN=32, BK=32, SUBK=1, num_warps=8)
        row_hardest_kernel[(triton.cdiv(p.n, cfg["BM"]),)](
            p.x, p.r, p.xn, p.rn, p.y, p.z, p.excl, *outs,
            p.n, p.m, p.d,
            KIND=p.kind_id, PREC=precision(allow_tf32), UPCAST=p.upcast, **cfg,
        )
    # a row the kernel did not write keeps the poison 2 (and index -1): reads as not found, caught by tests
    pv, pi, pf, nv, ni, nf = outs
    return pv, pi, pf == 1, nv, ni, nf == 1

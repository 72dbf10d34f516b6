"""Pair listing (PML ``PairMarginMiner`` / all pairs): ``pair_list``.

Positive pairs (i, j), j in P(i), with d'_ij > pos_lo, and negative pairs, j in Q(i), with d'_ij < neg_hi,
both in PML's row-major order (i, then j ascending). Two launches of one compiled kernel (``WRITE`` is a
run-time flag, so both passes evaluate d' with the same machine code): count per (query row, column
range), an exclusive prefix sum in int64 (torch) over (row, range) in row-major order, then write; inside a
column tile each row's write positions are its running offset plus an exclusive cumulative sum of the
selection along the row. Every write is masked to its (row, range) segment [offset, offset + count), so no
write can leave the allocated output even if the two passes disagreed. Column ranges (as in row_extreme)
fill the GPU when there are few row blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_d,
    check_float,
    column_split,
    device_guard,
    interpreting,
    labelled_tile,
    near_fraction,
    precision,
    prepare,
    query_rows,
)


@triton.jit(do_not_specialize=["N", "M", "SPAN", "WRITE"])
def pair_list_kernel(
    x_ptr,
    r_ptr,
    xn_ptr,
    rn_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    cnt_ptr,
    off_ptr,
    a1_ptr,
    p_ptr,
    a2_ptr,
    n_ptr,
    N,
    M,
    D,
    SPAN,
    pos_lo,
    neg_hi,
    WRITE,
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
    sid = tl.program_id(1).to(tl.int64)
    c0 = sid * SPAN
    c1 = tl.minimum(c0 + SPAN, M)
    # (row, range) slot of the (2, N, splits) counts and offsets; S = the number of ranges
    S = tl.num_programs(1).to(tl.int64)
    slot = rows * S + sid
    NS = N.to(tl.int64) * S
    runp = tl.zeros((BM,), tl.int64)
    runn = tl.zeros((BM,), tl.int64)
    endp = runp
    endn = runn
    if WRITE != 0:
        runp = tl.load(off_ptr + slot, mask=rmask, other=0)
        runn = tl.load(off_ptr + NS + slot, mask=rmask, other=0)
        endp = runp + tl.load(cnt_ptr + slot, mask=rmask, other=0)
        endn = runn + tl.load(cnt_ptr + NS + slot, mask=rmask, other=0)
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
        selp = (ok & same & (dp > pos_lo)).to(tl.int32)
        seln = (ok & (~same) & (dp < neg_hi)).to(tl.int32)
        if WRITE != 0:
            posp = runp[:, None] + (tl.cumsum(selp, axis=1) - selp).to(tl.int64)
            posn = runn[:, None] + (tl.cumsum(seln, axis=1) - seln).to(tl.int64)
            rr = rows[:, None] + tl.zeros((BM, BN), tl.int64)
            cc = cols[None, :] + tl.zeros((BM, BN), tl.int64)
            mp = (selp != 0) & (posp < endp[:, None])
            mn = (seln != 0) & (posn < endn[:, None])
            tl.store(a1_ptr + posp, rr, mask=mp)
            tl.store(p_ptr + posp, cc, mask=mp)
            tl.store(a2_ptr + posn, rr, mask=mn)
            tl.store(n_ptr + posn, cc, mask=mn)
        runp += tl.sum(selp, axis=1).to(tl.int64)
        runn += tl.sum(seln, axis=1).to(tl.int64)
    if WRITE == 0:
        tl.store(cnt_ptr + slot, runp, mask=rmask)
        tl.store(cnt_ptr + NS + slot, runn, mask=rmask)


def config(d):
    """Launch configuration of ``pair_list_kernel`` (one fixed config under the interpreter)."""
    if interpreting():
        return dict(BM=32, BN=32, BK=block_d(d), SUBK=16, num_warps=4)
    # 8 warps: with 4 the run-time WRITE branch needs 255 registers and spills on sm_90 (compile_check)
    return dict(BM=32, BN=32, BK=32, SUBK=1, num_warps=8, maxnreg=255)


def pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi, allow_tf32=None):
    """All selected pairs as PML lists ``(a1, p, a2, n)`` (int64, row-major order).

    Positive pairs need ``d' > pos_lo``, negative pairs ``d' < neg_hi`` (strict; PairMarginMiner's band,
    +-inf for no band). Square case (``r is None``): the diagonal is never a pair. ``allow_tf32``: None
    follows ``fastdml.config.fp32_precision()``.
    """
    p = prepare(x, y, r, z, excl, kind)
    pos_lo = check_float("pos_lo", pos_lo)
    neg_hi = check_float("neg_hi", neg_hi)
    dev = p.device
    empty = torch.empty(0, device=dev, dtype=torch.int64)
    if p.n == 0 or p.m == 0:
        return empty, empty.clone(), empty.clone(), empty.clone()
    cfg = config(p.d)
    prec = precision(allow_tf32)
    rows = triton.cdiv(p.n, cfg["BM"])
    splits, span = column_split(rows, p.m, cfg["BN"], dev)
    common = dict(KIND=p.kind_id, PREC=prec, UPCAST=p.upcast, NEAR=near_fraction(prec), **cfg)
    cnt = torch.full((2, p.n, splits), -1, device=dev, dtype=torch.int64)
    dummy = torch.empty(1, device=dev, dtype=torch.int64)
    args = (p.x, p.r, p.xn, p.rn, p.y, p.z, p.excl)
    with device_guard(dev):
        pair_list_kernel[(rows, splits)](
            *args, cnt, cnt, dummy, dummy, dummy, dummy, p.n, p.m, p.d, span, pos_lo, neg_hi, 0, **common
        )
    flat = cnt.view(2, -1)
    off = (torch.cumsum(flat, dim=1) - flat).contiguous()  # exclusive prefix sums over (row, range), int64
    tp, tn = (int(v) for v in flat.sum(1).tolist())
    # poisoned with -1 (every entry must be written); at least one element so no pointer is null
    a1, pp = (torch.full((max(tp, 1),), -1, device=dev, dtype=torch.int64) for _ in range(2))
    a2, nn = (torch.full((max(tn, 1),), -1, device=dev, dtype=torch.int64) for _ in range(2))
    with device_guard(dev):
        pair_list_kernel[(rows, splits)](
            *args, cnt, off, a1, pp, a2, nn, p.n, p.m, p.d, span, pos_lo, neg_hi, 1, **common
        )
    return a1[:tp], pp[:tp], a2[:tn], nn[:tn]

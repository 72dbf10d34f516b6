"""Pair listing (PML ``PairMarginMiner`` / all pairs): ``pair_list``.

Positive pairs (i, j), j in P(i), with d'_ij > pos_lo, and negative pairs, j in Q(i), with d'_ij < neg_hi,
both in PML's row-major order (i, then j ascending). Two launches of one row-owned kernel: count per query
row, an exclusive prefix sum in int64 (torch), then write; inside a column tile each row's write positions
are its running count plus an exclusive cumulative sum of the selection along the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_d, check_float, interpreting, labelled_tile, precision, prepare, query_rows


@triton.jit(do_not_specialize=["N", "M"])
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
    pos_lo,
    neg_hi,
    WRITE: tl.constexpr,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows, rmask, yl, ex = query_rows(tl.program_id(0), N, y_ptr, excl_ptr, BM)
    if WRITE:
        runp = tl.load(off_ptr + rows, mask=rmask, other=0)
        runn = tl.load(off_ptr + N + rows, mask=rmask, other=0)
    else:
        runp = tl.zeros((BM,), tl.int64)
        runn = tl.zeros((BM,), tl.int64)
    for j0 in range(0, M, BN):
        cols, dp, ok, same = labelled_tile(
            x_ptr, r_ptr, xn_ptr, rn_ptr, z_ptr, rows, rmask, yl, ex, j0, M, D, KIND, BM, BN, BK, SUBK, PREC, UPCAST
        )
        selp = (ok & same & (dp > pos_lo)).to(tl.int32)
        seln = (ok & (~same) & (dp < neg_hi)).to(tl.int32)
        if WRITE:
            posp = runp[:, None] + (tl.cumsum(selp, axis=1) - selp).to(tl.int64)
            posn = runn[:, None] + (tl.cumsum(seln, axis=1) - seln).to(tl.int64)
            rr = rows[:, None] + tl.zeros((BM, BN), tl.int64)
            cc = cols[None, :] + tl.zeros((BM, BN), tl.int64)
            tl.store(a1_ptr + posp, rr, mask=selp != 0)
            tl.store(p_ptr + posp, cc, mask=selp != 0)
            tl.store(a2_ptr + posn, rr, mask=seln != 0)
            tl.store(n_ptr + posn, cc, mask=seln != 0)
        runp += tl.sum(selp, axis=1).to(tl.int64)
        runn += tl.sum(seln, axis=1).to(tl.int64)
    if not WRITE:
        tl.store(cnt_ptr + rows, runp, mask=rmask)
        tl.store(cnt_ptr + N + rows, runn, mask=rmask)


def pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi, allow_tf32=False):
    """All selected pairs as PML lists ``(a1, p, a2, n)`` (int64, row-major order).

    Positive pairs need ``d' > pos_lo``, negative pairs ``d' < neg_hi`` (strict; PairMarginMiner's band,
    +-inf for no band). Square case (``r is None``): the diagonal is never a pair.
    """
    p = prepare(x, y, r, z, excl, kind)
    pos_lo = check_float("pos_lo", pos_lo)
    neg_hi = check_float("neg_hi", neg_hi)
    dev = p.device
    empty = torch.empty(0, device=dev, dtype=torch.int64)
    if p.n == 0 or p.m == 0:
        return empty, empty.clone(), empty.clone(), empty.clone()
    if interpreting():
        cfg = dict(BM=32, BN=32, BK=block_d(p.d), SUBK=16, num_warps=4)
    else:
        cfg = dict(BM=32, BN=32, BK=32, SUBK=1, num_warps=4)
    grid = (triton.cdiv(p.n, cfg["BM"]),)
    common = dict(KIND=p.kind_id, PREC=precision(allow_tf32), UPCAST=p.upcast, **cfg)
    cnt = torch.full((2, p.n), -1, device=dev, dtype=torch.int64)
    dummy = torch.empty(1, device=dev, dtype=torch.int64)
    pair_list_kernel[grid](
        p.x,
        p.r,
        p.xn,
        p.rn,
        p.y,
        p.z,
        p.excl,
        cnt,
        cnt,
        dummy,
        dummy,
        dummy,
        dummy,
        p.n,
        p.m,
        p.d,
        pos_lo,
        neg_hi,
        WRITE=False,
        **common,
    )
    off = torch.cumsum(cnt, dim=1) - cnt  # exclusive prefix sums, int64
    tp, tn = (int(v) for v in cnt.sum(1).tolist())
    # poisoned with -1 (every entry must be written); at least one element so no pointer is null
    a1, pp = (torch.full((max(tp, 1),), -1, device=dev, dtype=torch.int64) for _ in range(2))
    a2, nn = (torch.full((max(tn, 1),), -1, device=dev, dtype=torch.int64) for _ in range(2))
    off = off.contiguous()
    pair_list_kernel[grid](
        p.x,
        p.r,
        p.xn,
        p.rn,
        p.y,
        p.z,
        p.excl,
        cnt,
        off,
        a1,
        pp,
        a2,
        nn,
        p.n,
        p.m,
        p.d,
        pos_lo,
        neg_hi,
        WRITE=True,
        **common,
    )
    return a1[:tp], pp[:tp], a2[:tn], nn[:tn]

"""Fused contrastive statistics (PML ``ContrastiveLoss`` with ``PairMarginMiner`` band and reducer window).

Math (ARCHITECTURE.md, primitive 1), for anchor i and reference j (j not excluded):

- positive pair (z_j == y_i) selected iff d'_ij > pos_lo, term t = relu(d'_ij - pos_margin);
- negative pair (z_j != y_i) selected iff d'_ij < neg_hi, term t = relu(neg_margin - d'_ij);
- a selected term is counted iff low < t < high; S+/C+ and S-/C- are the sums/counts of counted terms.

Gradient parts (computed in the same sweep): part 0 = dS+/d(x, r) with pair weight g = [counted, t > 0],
part 1 = dS-/d(x, r) with g = -[counted, t > 0], turned into gradients by the common GEMM-shaped pass
(``_common.grad_tile``): every program owns a block of rows and a D group and keeps its accumulators in
registers, no atomics, deterministic.

Each program owns a block of rows, a D group (one group up to D = 128, so d' is computed once per pair and
sweep there) and a contiguous range of columns (``_common.column_split``: more programs when there are few
row blocks); each range writes its own partial statistics and gradient rows, summed over the ranges in a
fixed order by torch (no atomics, deterministic).

Square case: the weights are symmetric (g_ij = g_ji), so one row sweep with a factor 2 gives the whole
gradient (row and column contributions). Rectangular case: a second, column-owned sweep (programs own
blocks of r's rows, the same kernel with the roles of x and r swapped) gives gr.
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
    dprime_tile,
    grad_finish,
    grad_group,
    grad_tile,
    interpreting,
    near_fraction,
    pair_coef,
    poison,
    precision,
    prepare,
)


@triton.jit(do_not_specialize=["N_OWN", "N_OTH", "SPAN"])
def contrastive_kernel(
    own_ptr,
    oth_ptr,
    ownn_ptr,
    othn_ptr,
    ylab_ptr,
    zlab_ptr,
    excl_ptr,
    stats_ptr,
    gp_ptr,
    gn_ptr,
    nearp_ptr,
    nearn_ptr,
    N_OWN,
    N_OTH,
    D,
    SPAN,
    pos_margin,
    neg_margin,
    pos_lo,
    neg_hi,
    low,
    high,
    scale,
    KIND: tl.constexpr,
    COLMODE: tl.constexpr,
    STATS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BG: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    NEAR: tl.constexpr,
):
    pid = tl.program_id(0)
    g0 = tl.program_id(1).to(tl.int64) * BG
    sid = tl.program_id(2).to(tl.int64)
    c0 = sid * SPAN
    c1 = tl.minimum(c0 + SPAN, N_OTH)
    # this column range's partials: stats (4, N_OWN), gradients and near scratch (N_OWN, D) each
    stats_ptr += sid * 4 * N_OWN
    gp_ptr += sid * N_OWN * D
    gn_ptr += sid * N_OWN * D
    nearp_ptr += sid * N_OWN * D
    nearn_ptr += sid * N_OWN * D
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N_OWN
    yl = tl.load(ylab_ptr + rows, mask=rmask, other=0)
    if COLMODE == 0:
        ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    sp = tl.zeros((BM,), tl.float64)
    cp = tl.zeros((BM,), tl.int64)
    sn = tl.zeros((BM,), tl.float64)
    cn = tl.zeros((BM,), tl.int64)
    accp = tl.zeros((BM, BG), tl.float32)
    accn = tl.zeros((BM, BG), tl.float32)
    rsp = tl.zeros((BM,), tl.float32)
    rsn = tl.zeros((BM,), tl.float32)
    for j0 in range(c0, c1, BN):
        cols = j0 + tl.arange(0, BN).to(tl.int64)
        cmask = cols < c1
        zl = tl.load(zlab_ptr + cols, mask=cmask, other=0)
        dp, near = dprime_tile(
            own_ptr,
            oth_ptr,
            ownn_ptr,
            othn_ptr,
            rows,
            rmask,
            cols,
            cmask,
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
        valid = rmask[:, None] & cmask[None, :]
        if COLMODE == 0:
            valid = valid & (ex[:, None] != cols[None, :])
        else:
            # own rows are references, columns are queries: query `col` skips reference excl[col]
            exc = tl.load(excl_ptr + cols, mask=cmask, other=-1)
            valid = valid & (exc[None, :] != rows[:, None])
        same = yl[:, None] == zl[None, :]
        # relu keeps NaN (as F.relu); an infinite bound imposes no condition, so a NaN term passes it and
        # propagates (PML's mean), while a finite bound is a strict comparison that NaN fails (PML's filters)
        tp = tl.maximum(dp - pos_margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tn = tl.maximum(neg_margin - dp, 0.0, propagate_nan=tl.PropagateNan.ALL)
        no_low = low < -3.0e38
        no_high = high > 3.0e38
        cntp = valid & same & ((dp > pos_lo) | (pos_lo < -3.0e38)) & ((tp > low) | no_low) & ((tp < high) | no_high)
        cntn = valid & (~same) & ((dp < neg_hi) | (neg_hi > 3.0e38)) & ((tn > low) | no_low) & ((tn < high) | no_high)
        if STATS:
            sp += tl.sum(tl.where(cntp, tp, 0.0), axis=1).to(tl.float64)
            cp += tl.sum(cntp.to(tl.int32), axis=1).to(tl.int64)
            sn += tl.sum(tl.where(cntn, tn, 0.0), axis=1).to(tl.float64)
            cn += tl.sum(cntn.to(tl.int32), axis=1).to(tl.int64)
        if NEED_GRAD:
            wp = tl.where(cntp & (dp - pos_margin > 0), 1.0, 0.0)
            wn = tl.where(cntn & (neg_margin - dp > 0), -1.0, 0.0)
            accp, rsp = grad_tile(
                accp,
                rsp,
                pair_coef(wp, dp, KIND),
                near,
                own_ptr,
                oth_ptr,
                nearp_ptr,
                rows,
                rmask,
                cols,
                cmask,
                g0,
                D,
                KIND,
                BM,
                BN,
                BG,
                SUBK,
                PREC,
            )
            accn, rsn = grad_tile(
                accn,
                rsn,
                pair_coef(wn, dp, KIND),
                near,
                own_ptr,
                oth_ptr,
                nearn_ptr,
                rows,
                rmask,
                cols,
                cmask,
                g0,
                D,
                KIND,
                BM,
                BN,
                BG,
                SUBK,
                PREC,
            )
    if STATS:
        if g0 == 0:
            # row k of the (4, N) partials at k * N + rows, formed as int64 (rows is int64)
            tl.store(stats_ptr + rows, sp, mask=rmask)
            tl.store(stats_ptr + (rows + N_OWN), cp.to(tl.float64), mask=rmask)
            tl.store(stats_ptr + (rows + N_OWN + N_OWN), sn, mask=rmask)
            tl.store(stats_ptr + (rows + N_OWN + N_OWN + N_OWN), cn.to(tl.float64), mask=rmask)
    if NEED_GRAD:
        grad_finish(accp, rsp, own_ptr, nearp_ptr, gp_ptr, rows, rmask, g0, D, scale, KIND, BG, KIND != 2)
        grad_finish(accn, rsn, own_ptr, nearn_ptr, gn_ptr, rows, rmask, g0, D, scale, KIND, BG, KIND != 2)


def _config(d, dtype=torch.float32):
    """Block sizes: one config under the interpreter (speed there comes from few, large programs)."""
    if interpreting():
        return dict(BM=32, BN=32, BK=block_d(d), BG=grad_group(d), SUBK=16, num_warps=4)
    # one D group up to D = 128 (d' once per pair); (32, 16) tiles, 8 warps and maxnreg=255 keep the two
    # (BM, BG) accumulators in registers on sm_90 (4 warps, or 8 capped at 128 registers by ptxas, spill);
    # fp16/bf16 spill at BM = 32 on Triton 3.6, not at BM = 16 (bench/compile_check.py)
    bm = 32 if dtype in (torch.float32, torch.float64) else 16
    return dict(BM=bm, BN=16, BK=16, BG=grad_group(d), SUBK=1, num_warps=8, maxnreg=255)


def _sweep(p, own, oth, ownn, othn, ylab, zlab, n_own, n_oth, colmode, stats, need_grad, margins, scale, prec):
    """One sweep over (row block, D group, column range) programs; returns the statistics partials summed
    over the ranges ``(4, n_own)`` and the gradient parts ``(k, n_own, D)``."""
    cfg = _config(p.d, p.x.dtype)
    dev = p.device
    k = 2 if need_grad else 0
    rows = triton.cdiv(n_own, cfg["BM"]) if n_own else 0
    groups = triton.cdiv(p.d, cfg["BG"]) if need_grad else 1
    splits, span = column_split(rows * groups, n_oth, cfg["BN"], dev)
    parts = poison((k, splits, n_own, p.d), dev)  # gradient partials: (part, range, row, D)
    has_near = need_grad and p.kind_id != 2
    near = torch.zeros((k, splits, n_own, p.d), device=dev, dtype=torch.float32) if has_near else parts
    st = (
        poison((splits, 4, n_own), dev, torch.float64)
        if stats
        else torch.empty((1, 4, 1), device=dev, dtype=torch.float64)
    )
    if n_own == 0:
        return st.sum(0), parts.sum(1)
    gp = parts[0, 0] if need_grad else parts
    gn = parts[1, 0] if need_grad else parts
    np_ = near[0, 0] if has_near else parts
    nn_ = near[1, 0] if has_near else parts
    num_warps = cfg.pop("num_warps")
    with device_guard(dev):
        contrastive_kernel[(rows, groups, splits)](
            own,
            oth,
            ownn,
            othn,
            ylab,
            zlab,
            p.excl,
            st,
            gp,
            gn,
            np_,
            nn_,
            n_own,
            n_oth,
            p.d,
            span,
            *margins,
            scale,
            KIND=p.kind_id,
            COLMODE=colmode,
            STATS=stats,
            NEED_GRAD=need_grad,
            PREC=prec,
            UPCAST=p.upcast,
            NEAR=near_fraction(prec),
            num_warps=num_warps,
            **cfg,
        )
    # the ranges' partials, summed in a fixed order (deterministic)
    return (st[0] if splits == 1 else st.sum(0)), (parts[:, 0] if splits == 1 else parts.sum(1))


def contrastive_stats_fwd(
    x,
    y,
    r,
    z,
    excl,
    kind,
    pos_margin,
    neg_margin,
    pos_lo,
    neg_hi,
    low,
    high,
    need_grad,
    need_grad_r=True,
    allow_tf32=None,
):
    """Contrastive statistics ``[S+, C+, S-, C-]`` (float64) and their gradient parts.

    Returns ``(stats (4,) float64, gx_parts (2, N, D) float32, gr_parts (2, M, D) float32)``; the parts are
    ``dS+/d.`` and ``dS-/d.`` (empty ``(0, N, D)`` / ``(0, M, D)`` when ``need_grad`` is False; in the square
    case ``r is None`` the gradient is all in ``gx_parts`` and ``gr_parts`` is ``(0, 0, D)``). With
    ``need_grad_r=False`` (references that need no gradient) ``gr_parts`` is ``(0, M, D)`` and the
    column-side sweep is skipped.
    ``allow_tf32``: None (default) follows ``fastdml.config.fp32_precision()``; True/False force tf32/ieee.
    """
    p = prepare(x, y, r, z, excl, kind)
    margins = tuple(
        check_float(nm, v)
        for nm, v in (
            ("pos_margin", pos_margin),
            ("neg_margin", neg_margin),
            ("pos_lo", pos_lo),
            ("neg_hi", neg_hi),
            ("low", low),
            ("high", high),
        )
    )
    need_grad = bool(need_grad)
    prec = precision(allow_tf32)
    st, gx = _sweep(
        p, p.x, p.r, p.xn, p.rn, p.y, p.z, p.n, p.m, 0, True, need_grad, margins, 2.0 if p.square else 1.0, prec
    )
    stats = st.sum(1) if p.n > 0 else torch.zeros(4, device=p.device, dtype=torch.float64)
    if p.square:
        gr = torch.empty((0, 0, p.d), device=p.device, dtype=torch.float32)
    elif need_grad and need_grad_r:
        _, gr = _sweep(p, p.r, p.x, p.rn, p.xn, p.z, p.y, p.m, p.n, 1, False, True, margins, 1.0, prec)
    else:
        gr = torch.empty((0, p.m, p.d), device=p.device, dtype=torch.float32)
    return stats, gx, gr

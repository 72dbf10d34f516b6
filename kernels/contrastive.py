"""Fused contrastive statistics (PML ``ContrastiveLoss`` with ``PairMarginMiner`` band and reducer window).

Math (ARCHITECTURE.md, primitive 1), for anchor i and reference j (j not excluded):

- positive pair (z_j == y_i) selected iff d'_ij > pos_lo, term t = relu(d'_ij - pos_margin);
- negative pair (z_j != y_i) selected iff d'_ij < neg_hi, term t = relu(neg_margin - d'_ij);
- a selected term is counted iff low < t < high; S+/C+ and S-/C- are the sums/counts of counted terms.

Gradient parts (computed in the same sweep): part 0 = dS+/d(x, r) with pair weight g = [counted, t > 0],
part 1 = dS-/d(x, r) with g = -[counted, t > 0]; with c = g dd'/dq (``_common.pair_coef``) the owned rows get
sum_j c_ij (x_i - r_j) (l2/sql2; near-duplicate entries by direct differences) or -sum_j c_ij r_j (dot).

Every program owns a block of rows and a contiguous range of columns (``_common.column_split``: more ranges
when there are few row blocks). d' is computed once per pair and sweep, for every D: the program loops over
D chunks for the dot, forms the tile's coefficients, then applies them to every D group, keeping the
(rows, D) accumulators in registers up to D = 128 (one group) and above it adding each tile into its own
partial rows (a read-modify-write of rows no other program touches). Each range writes its own partial
statistics and gradient rows, summed over the ranges in a fixed order by torch.

Square case (``r is None``), two modes with identical semantics (exclusions, near-duplicate recompute, NaN
propagation, band and window):

- upper triangle (the default, and always without gradient): the programs own pairs of row blocks
  (a, nb - 1 - a, so every program sweeps about N + BM columns) and each row block sweeps only the columns
  from its diagonal block on, half the d' work. The diagonal block counts once; an off-diagonal entry
  stands for (i, j) and (j, i): weight 2 in the statistics (still per-program partials, deterministic), and
  its transposed gradient sum_i c_ij (x_j - x_i) is added to rows j with ``tl.atomic_add`` (fp32 sums in
  arrival order: not bitwise repeatable);
- full square, row-owned (``deterministic=True``, chosen under ``torch.use_deterministic_algorithms(True)``
  by ``fastdml.dispatch.kernel_atomics``): the weights are symmetric (g_ij = g_ji), so one row sweep of
  every pair with a factor 2 gives the whole gradient, with no atomics (bitwise repeatable).

Rectangular case: a second, column-owned sweep (programs own blocks of r's rows, the same kernel with the
roles of x and r swapped) gives gr.
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


@triton.jit
def _terms(dp, valid, same, pos_margin, neg_margin, pos_lo, neg_hi, low, high):
    """The selection rules of one tile: ``(tp, tn, cntp, cntn)``, the positive/negative terms and which of
    them are counted."""
    # relu keeps NaN (as F.relu); an infinite bound imposes no condition, so a NaN term passes it and
    # propagates (PML's mean), while a finite bound is a strict comparison that NaN fails (PML's filters)
    tp = tl.maximum(dp - pos_margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tn = tl.maximum(neg_margin - dp, 0.0, propagate_nan=tl.PropagateNan.ALL)
    no_low = low < -3.0e38
    no_high = high > 3.0e38
    cntp = valid & same & ((dp > pos_lo) | (pos_lo < -3.0e38)) & ((tp > low) | no_low) & ((tp < high) | no_high)
    cntn = valid & (~same) & ((dp < neg_hi) | (neg_hi > 3.0e38)) & ((tn > low) | no_low) & ((tn < high) | no_high)
    return tp, tn, cntp, cntn


@triton.jit
def _owned_rmw(
    c,
    near,
    own_ptr,
    oth_ptr,
    g_ptr,
    near_ptr,
    rows,
    rmask,
    cols,
    cmask,
    D,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BG: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Add one tile's ``c @ oth`` to the owned partial rows ``g[rows]`` group by group (D above one group):
    a read-modify-write of rows only this program touches, ordered by a barrier (deterministic)."""
    for g0 in range(0, D, BG):
        kk = g0 + tl.arange(0, BG)
        offs = rows[:, None] * D + kk[None, :]
        m2 = rmask[:, None] & (kk[None, :] < D)
        acc = tl.load(g_ptr + offs, mask=m2, other=0.0)
        acc, _ = grad_tile(acc, tl.zeros((BM,), tl.float32), c, near, own_ptr, oth_ptr, near_ptr, rows, rmask, cols,
            cmask, g0, D, KIND, BM, BN, BG, SUBK, PREC)  # fmt: skip
        tl.store(g_ptr + offs, acc, mask=m2)
        tl.debug_barrier()


@triton.jit
def _owned_finish(
    acc,
    rs,
    own_ptr,
    near_ptr,
    g_ptr,
    rows,
    rmask,
    D,
    scale,
    KIND: tl.constexpr,
    BG: tl.constexpr,
    ONE_GROUP: tl.constexpr,
):
    """g[rows] = scale * (rs * own - acc + near) (l2/sql2) or -scale * acc (dot), from the registers (one
    group) or from the partial rows accumulated in ``g`` (several groups, finished in place)."""
    if ONE_GROUP:
        grad_finish(acc, rs, own_ptr, near_ptr, g_ptr, rows, rmask, 0, D, scale, KIND, BG, KIND != 2)
    else:
        tl.debug_barrier()
        for g0 in range(0, D, BG):
            kk = g0 + tl.arange(0, BG)
            m2 = rmask[:, None] & (kk[None, :] < D)
            part = tl.load(g_ptr + rows[:, None] * D + kk[None, :], mask=m2, other=0.0)
            grad_finish(part, rs, own_ptr, near_ptr, g_ptr, rows, rmask, g0, D, scale, KIND, BG, KIND != 2)


@triton.jit
def _transposed_add(
    c,
    near,
    x_ptr,
    t_ptr,
    rows,
    rmask,
    cols,
    cmask,
    D,
    scale,
    KIND: tl.constexpr,
    BT: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
):
    """The transposed contribution of an upper-triangle tile to the column rows, added atomically to ``t``:
    t[j] += scale * sum_i c_ij (x_j - x_i) (l2/sql2; near entries by direct differences) or
    -scale * sum_i c_ij x_i (dot), in D groups of BT."""
    cf = tl.where(near, 0.0, c)
    cs = tl.sum(cf, axis=0)
    cnr = tl.where(near, c, 0.0)
    has_near = tl.max((cnr != 0).to(tl.int32)) > 0
    for g0 in range(0, D, BT):
        kk = g0 + tl.arange(0, BT)
        km = kk < D
        xi = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        xi = xi.to(tl.float32)
        tm = cmask[:, None] & km[None, :]
        if KIND == 2:
            res = -tl.dot(tl.trans(c), xi, input_precision=PREC)
        else:
            xj = tl.load(x_ptr + cols[:, None] * D + kk[None, :], mask=tm, other=0.0).to(tl.float32)
            res = cs[:, None] * xj - tl.dot(tl.trans(cf), xi, input_precision=PREC)
        tl.atomic_add(t_ptr + cols[:, None] * D + kk[None, :], res * scale, mask=tm, sem="relaxed")
        if KIND != 2:
            if has_near:
                for k0 in range(0, BT, SUBK):
                    k2 = g0 + k0 + tl.arange(0, SUBK)
                    m2 = k2 < D
                    a = tl.load(x_ptr + rows[:, None] * D + k2[None, :], mask=rmask[:, None] & m2[None, :], other=0.0)
                    b = tl.load(x_ptr + cols[:, None] * D + k2[None, :], mask=cmask[:, None] & m2[None, :], other=0.0)
                    diff = b.to(tl.float32)[None, :, :] - a.to(tl.float32)[:, None, :]
                    part = tl.sum(cnr[:, :, None] * diff, axis=0)
                    nptr = t_ptr + cols[:, None] * D + k2[None, :]
                    tl.atomic_add(nptr, part * scale, mask=cmask[:, None] & m2[None, :], sem="relaxed")


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
    tp_ptr,
    tn_ptr,
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
    TRI: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BG: tl.constexpr,
    BT: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    NEAR: tl.constexpr,
):
    """Program (pid, sid): row block pid (``TRI``: row blocks pid and nb - 1 - pid) against column range
    sid; writes its statistics partials (4, rows) and gradient partial rows (``g``, ``near``) in slot sid;
    ``TRI`` adds the transposed contributions of off-diagonal entries to ``t`` atomically."""
    pid = tl.program_id(0)
    sid = tl.program_id(1).to(tl.int64)
    # this column range's partials: stats (4, N_OWN), gradients and near scratch (N_OWN, D) each
    stats_ptr += sid * 4 * N_OWN
    gp_ptr += sid * N_OWN * D
    gn_ptr += sid * N_OWN * D
    nearp_ptr += sid * N_OWN * D
    nearn_ptr += sid * N_OWN * D
    if TRI:
        # row blocks a = pid and b = nb - 1 - pid, each against its columns from its diagonal block on; their
        # concatenation (about N + BM columns for every pair) is cut into ranges of SPAN
        nb = tl.cdiv(N_OWN, BM)
        rb_a = pid
        rb_b = nb - 1 - pid
        la = N_OWN - rb_a * BM
        lb = tl.where(rb_b > rb_a, N_OWN - rb_b * BM, 0)
        s0 = sid * SPAN
        s1 = s0 + SPAN
        phases = 2
    else:
        phases = 1
    for ph in range(0, phases):
        if TRI:
            rb = tl.where(ph == 0, rb_a, rb_b)
            lo = tl.where(ph == 0, tl.minimum(s0, la), tl.minimum(tl.maximum(s0 - la, 0), lb)) + rb * BM
            hi = tl.where(ph == 0, tl.minimum(s1, la), tl.minimum(tl.maximum(s1 - la, 0), lb)) + rb * BM
        else:
            rb = pid
            lo = sid * SPAN
            hi = tl.minimum(lo + SPAN, N_OTH)

        if lo < hi:
            rows = rb.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
            rmask = rows < N_OWN
            yl = tl.load(ylab_ptr + rows, mask=rmask, other=0)
            if COLMODE == 0:
                ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
            diag_end = (rb.to(tl.int64) + 1) * BM  # TRI: columns below it are the diagonal block
            sp = tl.zeros((BM,), tl.float64)
            cp = tl.zeros((BM,), tl.int64)
            sn = tl.zeros((BM,), tl.float64)
            cn = tl.zeros((BM,), tl.int64)
            accp = tl.zeros((BM, BG), tl.float32)
            accn = tl.zeros((BM, BG), tl.float32)
            rsp = tl.zeros((BM,), tl.float32)
            rsn = tl.zeros((BM,), tl.float32)
            for j0 in range(lo, hi, BN):
                cols = j0 + tl.arange(0, BN).to(tl.int64)
                cmask = cols < hi
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
                tp, tn, cntp, cntn = _terms(
                    dp, valid, yl[:, None] == zl[None, :], pos_margin, neg_margin, pos_lo, neg_hi, low, high
                )
                if STATS:
                    if TRI:
                        # an off-diagonal entry stands for the pairs (i, j) and (j, i)
                        w = tl.where(cols[None, :] >= diag_end, 2, 1)
                    else:
                        w = tl.full((1, BN), 1, tl.int32)
                    sp += tl.sum(tl.where(cntp, tp * w, 0.0), axis=1).to(tl.float64)
                    cp += tl.sum(tl.where(cntp, w, 0), axis=1).to(tl.int64)
                    sn += tl.sum(tl.where(cntn, tn * w, 0.0), axis=1).to(tl.float64)
                    cn += tl.sum(tl.where(cntn, w, 0), axis=1).to(tl.int64)
                if NEED_GRAD:
                    cfp = pair_coef(tl.where(cntp & (dp - pos_margin > 0), 1.0, 0.0), dp, KIND)
                    cfn = pair_coef(tl.where(cntn & (neg_margin - dp > 0), -1.0, 0.0), dp, KIND)
                    if ONE_GROUP:
                        accp, rsp = grad_tile(accp, rsp, cfp, near, own_ptr, oth_ptr, nearp_ptr, rows, rmask, cols,
                            cmask, 0, D, KIND, BM, BN, BG, SUBK, PREC)  # fmt: skip
                        accn, rsn = grad_tile(accn, rsn, cfn, near, own_ptr, oth_ptr, nearn_ptr, rows, rmask, cols,
                            cmask, 0, D, KIND, BM, BN, BG, SUBK, PREC)  # fmt: skip
                    else:
                        rsp += tl.sum(tl.where(near, 0.0, cfp), axis=1)
                        rsn += tl.sum(tl.where(near, 0.0, cfn), axis=1)
                        _owned_rmw(cfp, near, own_ptr, oth_ptr, gp_ptr, nearp_ptr, rows, rmask, cols, cmask, D, KIND,
                            BM, BN, BG, SUBK, PREC)  # fmt: skip
                        _owned_rmw(cfn, near, own_ptr, oth_ptr, gn_ptr, nearn_ptr, rows, rmask, cols, cmask, D, KIND,
                            BM, BN, BG, SUBK, PREC)  # fmt: skip
                    if TRI:
                        if j0 + BN > diag_end:
                            off = cols[None, :] >= diag_end
                            _transposed_add(tl.where(off, cfp, 0.0), near, own_ptr, tp_ptr, rows, rmask, cols, cmask,
                                D, scale, KIND, BT, SUBK, PREC)  # fmt: skip
                            _transposed_add(tl.where(off, cfn, 0.0), near, own_ptr, tn_ptr, rows, rmask, cols, cmask,
                                D, scale, KIND, BT, SUBK, PREC)  # fmt: skip
            if STATS:
                # row k of the (4, N) partials at k * N + rows, formed as int64 (rows is int64)
                tl.store(stats_ptr + rows, sp, mask=rmask)
                tl.store(stats_ptr + (rows + N_OWN), cp.to(tl.float64), mask=rmask)
                tl.store(stats_ptr + (rows + N_OWN + N_OWN), sn, mask=rmask)
                tl.store(stats_ptr + (rows + N_OWN + N_OWN + N_OWN), cn.to(tl.float64), mask=rmask)
            if NEED_GRAD:
                _owned_finish(accp, rsp, own_ptr, nearp_ptr, gp_ptr, rows, rmask, D, scale, KIND, BG, ONE_GROUP)
                _owned_finish(accn, rsn, own_ptr, nearn_ptr, gn_ptr, rows, rmask, D, scale, KIND, BG, ONE_GROUP)


def _config(d, dtype=torch.float32, prec="ieee"):
    """Block sizes: one config under the interpreter (speed there comes from few, large programs)."""
    if interpreting():
        return dict(BM=32, BN=32, BK=block_d(d), BG=grad_group(d), BT=grad_group(d), SUBK=16, num_warps=4)
    # (32, 16) tiles, 8 warps and maxnreg=255 keep the two (BM, BG) accumulators in registers on sm_90 (4
    # warps, or 8 capped at 128 registers by ptxas, spill); fp16/bf16 and the split tf32 dots spill at BM = 32
    # and with 32-wide transposed groups, not at 16. Above D = 128 (no accumulators) 32-wide groups.
    bm = 32 if dtype in (torch.float32, torch.float64) and prec == "ieee" else 16
    bg = grad_group(d) if d <= 128 else 32
    bt = min(bm, bg)
    return dict(BM=bm, BN=16, BK=16, BG=bg, BT=bt, SUBK=1, num_warps=8, maxnreg=255)


def _plan(n_own, n_oth, d, dtype, prec, tri, device):
    """``(cfg, programs, splits, span)`` of one sweep: the row-block programs (row-block pairs in the upper
    triangle) times the column ranges reach ``_common.target_ctas``."""
    cfg = _config(d, dtype, prec)
    rows = triton.cdiv(n_own, cfg["BM"]) if n_own else 0
    if tri:
        # a pair of row blocks sweeps at most N + BM columns
        programs = triton.cdiv(rows, 2)
        splits, span = column_split(programs, n_own + cfg["BM"], cfg["BN"], device)
    else:
        programs = rows
        splits, span = column_split(rows, n_oth, cfg["BN"], device)
    return cfg, programs, splits, span


def buffer_bytes(n, m, d, need_grad, device=None) -> int:
    """Upper bound of the bytes of the buffers one call allocates (``kernels.memory``): per sweep the
    gradient partials and near scratch ``(k, S, rows, D)``, their sum and the transposed part ``(k, rows, D)``,
    the statistics partials ``(S, 4, rows)``; the largest over the dtypes, precisions and sweeps."""
    k = 2 if need_grad else 0
    total = 0
    for dtype, prec in ((torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.float16, "ieee")):
        for own, oth, tri in ((n, m, False), (m, n, False), (n, n, True)):
            s = _plan(own, oth, d, dtype, prec, tri, device)[2]
            total = max(total, 2 * k * s * own * d * 4 + 2 * k * own * d * 4 + s * 4 * own * 8)
    return total


def _fresh(shape, device, dtype=torch.float32, zero=False):
    """A zeroed buffer, or one filled with NaN (``_common.poison``) where the kernel writes every entry."""
    return torch.zeros(shape, device=device, dtype=dtype) if zero else poison(shape, device, dtype)


def _sweep(p, own, oth, ownn, othn, ylab, zlab, n_own, n_oth, colmode, stats, need_grad, margins, scale, prec, tri):
    """One sweep over (row block, column range) programs (``tri``: row-block pairs over the upper triangle);
    returns the statistics partials summed over the ranges ``(4, n_own)`` and the gradient parts
    ``(k, n_own, D)``."""
    dev = p.device
    cfg, programs, splits, span = _plan(n_own, n_oth, p.d, p.x.dtype, prec, tri, dev)
    assert cfg["BM"] % cfg["BN"] == 0  # the diagonal block ends on a column tile
    one_group = p.d <= cfg["BG"]
    k = 2 if need_grad else 0
    # every (range, row) slot is written once, except in the triangle (ranges that miss a row block) and
    # above one D group (accumulated in place): zeros there, NaN elsewhere so that a missed write shows
    once = one_group and not tri
    parts = _fresh((k, splits, n_own, p.d), dev, zero=not once)  # gradient partials: (part, range, row, D)
    has_near = need_grad and p.kind_id != 2
    near = _fresh((k, splits, n_own, p.d), dev, zero=True) if has_near else parts
    # the transposed contributions of the upper triangle (atomic adds)
    trans = _fresh((k, n_own, p.d), dev, zero=True) if tri and need_grad else parts
    st = _fresh((splits, 4, n_own) if stats else (1, 4, 1), dev, torch.float64, zero=tri)
    if n_own == 0 or n_oth == 0:  # nothing to sweep: zero sums, counts and gradients
        return st.zero_().sum(0), parts.zero_().sum(1)
    gp, gn = (parts[0, 0], parts[1, 0]) if need_grad else (parts, parts)
    np_, nn_ = (near[0, 0], near[1, 0]) if has_near else (parts, parts)
    tp, tn = (trans[0], trans[1]) if tri and need_grad else (parts, parts)
    num_warps = cfg.pop("num_warps")
    with device_guard(dev):
        contrastive_kernel[(programs, splits)](
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
            tp,
            tn,
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
            TRI=tri,
            ONE_GROUP=one_group,
            PREC=prec,
            UPCAST=p.upcast,
            NEAR=near_fraction(prec),
            num_warps=num_warps,
            **cfg,
        )
    # the ranges' partials, summed in a fixed order (deterministic); then the atomically added part
    st = st[0] if splits == 1 else st.sum(0)
    g = parts[:, 0] if splits == 1 else parts.sum(1)
    if tri and need_grad:
        g = g + trans
    return st, g


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
    deterministic=None,
):
    """Contrastive statistics ``[S+, C+, S-, C-]`` (float64) and their gradient parts, in one sweep.

    Args:
        x, y: queries (N, D) float32/float16/bfloat16 and their int64 labels (N,).
        r, z: references (M, D) and their labels (M,); both None for the square case (r = x, diagonal
            excluded).
        excl: int64 (N,), the reference each query skips (-1: none); None in the square case.
        kind: ``"l2"``, ``"sql2"`` or ``"dot"``.
        pos_margin, neg_margin, pos_lo, neg_hi, low, high: margins, the miner's band, the reducer's window
            (infinite: no condition).
        need_grad: also the gradient parts. need_grad_r: also the references' parts (rectangular case;
            False skips the column-side sweep).
        allow_tf32: None (default) follows ``fastdml.config.fp32_precision()``; True/False force tf32/ieee.
        deterministic: None (default) follows ``fastdml.dispatch.kernel_atomics()`` (atomics unless
            ``torch.use_deterministic_algorithms(True)``). True keeps the square case's gradient on the
            row-owned full square (bitwise repeatable); False sweeps the upper triangle and adds the
            transposed half atomically. The statistics are deterministic either way.

    Shape:
        stats (4,) float64; gx_parts (2, N, D) float32, ``dS+/dx`` and ``dS-/dx``; gr_parts (2, M, D)
        float32, the same for r. Without ``need_grad`` the parts are ``(0, N, D)`` / ``(0, M, D)``; in the
        square case the whole gradient is in gx_parts and gr_parts is ``(0, 0, D)``; with
        ``need_grad_r=False`` gr_parts is ``(0, M, D)``.
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
    if deterministic is None:
        from fastdml import dispatch

        deterministic = not dispatch.kernel_atomics()
    # the upper triangle: square case, statistics only (no atomics) or atomics allowed
    tri = p.square and not (need_grad and deterministic)
    st, gx = _sweep(
        p, p.x, p.r, p.xn, p.rn, p.y, p.z, p.n, p.m, 0, True, need_grad, margins, 2.0 if p.square else 1.0, prec, tri
    )
    stats = st.sum(1) if p.n > 0 else torch.zeros(4, device=p.device, dtype=torch.float64)
    if p.square:
        gr = torch.empty((0, 0, p.d), device=p.device, dtype=torch.float32)
    elif need_grad and need_grad_r:
        _, gr = _sweep(p, p.r, p.x, p.rn, p.xn, p.z, p.y, p.m, p.n, 1, False, True, margins, 1.0, prec, False)
    else:
        gr = torch.empty((0, p.m, p.d), device=p.device, dtype=torch.float32)
    return stats, gx, gr

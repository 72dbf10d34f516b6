"""Triplet-shaped ops over staged d' rows: ``triplet_stats_fwd``, ``semihard_stats_fwd``, ``triplet_list``.

Per anchor i (one program each), positives p in P(i) (an index range of the label-sorted references, see
``_staged``) against negatives n in Q(i) (column tiles in natural order):

- ``triplet_stats`` (batch-all / all triplets, ARCHITECTURE.md primitive 2): with t = d'_in - d'_ip and
  v = d'_ip - d'_in + margin, the triplet is selected iff band_lo < t <= band_hi; term relu(v) (softplus(v)
  if ``smooth``), counted iff low < term < high. Weights dS/dd'_ip = sum_n [counted] term'(v) and
  dS/dd'_in = -sum_p [counted] term'(v).
- ``semihard_stats`` (TF-Addons, primitive 3): n* = the negative with the smallest d'_in > d'_ip, else the
  one with the largest d'_in (ties: lowest index), kept as running (value, index) pairs across negative
  tiles; S = sum relu(d'_ip - d'_in* + margin) over positive pairs of anchors with a negative, C their
  number. Weights [v > 0] on (i, p) and -[v > 0] on (i, n*) (a second sweep counts, per negative, the
  positives that chose it: no scatter, no atomics).
- ``triplet_list`` (primitive 6): selected triplets in PML's lexicographic (a, p, n) order: count per
  anchor, exclusive prefix sum (int64), write; inside an anchor the positive rows take consecutive ranges
  (exclusive cumsum of per-positive counts) and each row writes in negative order (cumsum along the row).

The loads of positives/negatives are written out inline in each loop (not jit helpers): the interpreter
re-patches the language on every helper call, which dominated the CPU test time.

Every per-anchor kernel owns its anchor's weight row (no atomics) and writes every entry of it with plain
stores, so W needs no zeroing and no entry is read-modified-written per tile. When every class has at most
``_staged.MAX_ONE_BLOCK`` members (``ONE_BLOCK``), an anchor's positives are held in one block: the negative
tiles' weights are stored, then the positives'. Larger classes take positive blocks in turn: each
positive's weight is complete after its block; each negative tile's weight is summed over the blocks in a
second loop and stored once (``triplet_stats`` evaluates the terms again there; ``semihard_stats`` parks
each positive's n* in the positive's own W slot as int32 and counts the positives that chose each
negative, then turns the slots into the positives' weights). Barriers separate these phases only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _fail, check_float, device_guard, poison, precision, prepare
from ._staged import Stager, empty_parts, launch_opts


@triton.jit
def _anchor_setup(y_ptr, excl_ptr, plo_ptr, phi_ptr, A0, pid, M):
    a = A0 + pid.to(tl.int64)
    ya = tl.load(y_ptr + a)
    ex = tl.load(excl_ptr + a)
    lo = tl.load(plo_ptr + a)
    hi = tl.load(phi_ptr + a)
    # an anchor whose class takes every reference has no negative: nothing to compare
    hi = tl.where(hi - lo >= M, lo, hi)
    return ya, ex, lo, hi


@triton.jit
def _positive_block(buf_row, perm_ptr, t0, hi, ex, BP: tl.constexpr):
    """Positive slots t0..t0+BP of the anchor's label run: (column, valid, d'_ap)."""
    ts = t0 + tl.arange(0, BP).to(tl.int64)
    tm = ts < hi
    pidx = tl.load(perm_ptr + ts, mask=tm, other=0)
    pm = tm & (pidx != ex)
    dap = tl.load(buf_row + pidx, mask=pm, other=0.0)
    return pidx, pm, dap


@triton.jit
def _negative_cols(z_ptr, j0, M, ya, ex, BT: tl.constexpr):
    """Reference columns j0..j0+BT and which of them are the anchor's negatives (other label, not excluded)."""
    cols = j0 + tl.arange(0, BT).to(tl.int64)
    cm = cols < M
    zl = tl.load(z_ptr + cols, mask=cm, other=0)
    return cols, cm & (zl != ya) & (cols != ex)


@triton.jit
def _in_band(dap, dan, pm, nm, band_lo, band_hi):
    """(p, n) pairs of the tile selected by the miner's band ``band_lo < d'_an - d'_ap <= band_hi``
    (an infinite bound imposes no condition)."""
    t = dan[None, :] - dap[:, None]
    sel = pm[:, None] & nm[None, :] & ((t > band_lo) | (band_lo < -3.0e38))
    return sel & ((t <= band_hi) | (band_hi > 3.0e38))


@triton.jit
def _counted(dap, dan, pm, nm, margin, band_lo, band_hi, low, high, SMOOTH: tl.constexpr):
    """(term, counted, dterm/dv) of a (positive block, negative tile) of one anchor; dterm is 0 where the
    triplet is not counted (relu: also where v <= 0)."""
    v = dap[:, None] - dan[None, :] + margin
    sel = _in_band(dap, dan, pm, nm, band_lo, band_hi)
    if SMOOTH:
        term = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.log(1.0 + tl.exp(-tl.abs(v)))
    else:
        term = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    # an infinite bound imposes no condition (NaN passes and propagates); a finite one is strict
    cnt = sel & ((term > low) | (low < -3.0e38)) & ((term < high) | (high > 3.0e38))
    if SMOOTH:
        dterm = tl.where(cnt, 1.0 / (1.0 + tl.exp(-v)), 0.0)
    else:
        dterm = tl.where(cnt & (v > 0), 1.0, 0.0)
    return term, cnt, dterm


@triton.jit(do_not_specialize=["A0", "M", "LD"])
def triplet_anchor_kernel(
    buf_ptr,
    w_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    perm_ptr,
    plo_ptr,
    phi_ptr,
    part_ptr,
    A0,
    M,
    LD,
    margin,
    band_lo,
    band_hi,
    low,
    high,
    SMOOTH: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BP: tl.constexpr,
    BT: tl.constexpr,
):
    pid = tl.program_id(0)
    ya, ex, lo, hi = _anchor_setup(y_ptr, excl_ptr, plo_ptr, phi_ptr, A0, pid, M)
    buf_row = buf_ptr + pid.to(tl.int64) * LD
    w_row = w_ptr + pid.to(tl.int64) * LD
    s = tl.zeros((1,), tl.float64)
    c = tl.zeros((1,), tl.int64)
    # ONE_BLOCK: every anchor's positives fit one block, which runs once (even when empty), so each W entry
    # is written once by a plain store (no zeroed W, no read-modify-write)
    t_end = lo + 1 if ONE_BLOCK else hi
    for t0 in range(lo, t_end, BP):
        pidx, pm, dap = _positive_block(buf_row, perm_ptr, t0, hi, ex, BP)
        wp = tl.zeros((BP,), tl.float32)
        for j0 in range(0, M, BT):
            cols, nm = _negative_cols(z_ptr, j0, M, ya, ex, BT)
            dan = tl.load(buf_row + cols, mask=nm, other=0.0)
            term, cnt, dterm = _counted(dap, dan, pm, nm, margin, band_lo, band_hi, low, high, SMOOTH)
            s += tl.sum(tl.sum(tl.where(cnt, term, 0.0), axis=1), axis=0).to(tl.float64)
            c += tl.sum(tl.sum(cnt.to(tl.int32), axis=1), axis=0).to(tl.int64)
            if NEED_GRAD:
                wp += tl.sum(dterm, axis=1)
                if ONE_BLOCK:
                    # the whole tile: the negatives' weights, 0 elsewhere (positives are stored below)
                    tl.store(w_row + cols, -tl.sum(dterm, axis=0), mask=cols < M)
        if NEED_GRAD:
            # after the tiles' stores (which wrote 0 on the positive columns in ONE_BLOCK mode)
            tl.debug_barrier()
            tl.store(w_row + pidx, wp, mask=pm)
            tl.debug_barrier()
    if NEED_GRAD and not ONE_BLOCK:
        # larger classes: each negative tile's weights summed over the positive blocks, then one plain store
        # on every column but the positives (the terms are evaluated a second time; no read-modify-write)
        none = (tl.zeros((BT,), tl.int64) + lo) >= hi  # no positive (no class run, or it takes every column)
        for j0 in range(0, M, BT):
            cols, nm = _negative_cols(z_ptr, j0, M, ya, ex, BT)
            dan = tl.load(buf_row + cols, mask=nm, other=0.0)
            wn = tl.zeros((BT,), tl.float32)
            for t0 in range(lo, hi, BP):
                pidx, pm, dap = _positive_block(buf_row, perm_ptr, t0, hi, ex, BP)
                _, _, dterm = _counted(dap, dan, pm, nm, margin, band_lo, band_hi, low, high, SMOOTH)
                wn += tl.sum(dterm, axis=0)
            zl = tl.load(z_ptr + cols, mask=cols < M, other=0)
            tl.store(w_row + cols, -wn, mask=(cols < M) & ((zl != ya) | (cols == ex) | none))
    one = tl.arange(0, 1)
    tl.store(part_ptr + 2 * (A0 + pid.to(tl.int64)) + one, s)
    tl.store(part_ptr + 2 * (A0 + pid.to(tl.int64)) + 1 + one, c.to(tl.float64))


@triton.jit(do_not_specialize=["A0", "M", "LD"])
def semihard_anchor_kernel(
    buf_ptr,
    w_ptr,
    wi_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    perm_ptr,
    plo_ptr,
    phi_ptr,
    part_ptr,
    A0,
    M,
    LD,
    margin,
    NEED_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BP: tl.constexpr,
    BT: tl.constexpr,
):
    pid = tl.program_id(0)
    ya, ex, lo, hi = _anchor_setup(y_ptr, excl_ptr, plo_ptr, phi_ptr, A0, pid, M)
    buf_row = buf_ptr + pid.to(tl.int64) * LD
    w_row = w_ptr + pid.to(tl.int64) * LD
    wi_row = wi_ptr + pid.to(tl.int64) * LD  # the same row of W read as int32 (n* of each positive)
    s = tl.zeros((1,), tl.float64)
    c = tl.zeros((1,), tl.int64)
    t_end = lo + 1 if ONE_BLOCK else hi  # as in triplet_anchor_kernel: one block, plain stores of W
    for t0 in range(lo, t_end, BP):
        pidx, pm, dap = _positive_block(buf_row, perm_ptr, t0, hi, ex, BP)
        ab_v = tl.full((BP,), float("inf"), tl.float32)
        ab_i = tl.full((BP,), -1, tl.int64)
        mx_v = tl.full((BP,), float("-inf"), tl.float32)
        mx_i = tl.full((BP,), -1, tl.int64)
        for j0 in range(0, M, BT):
            cols, nm = _negative_cols(z_ptr, j0, M, ya, ex, BT)
            dan = tl.load(buf_row + cols, mask=nm, other=0.0)
            dd = dan[None, :] + tl.zeros((BP, BT), tl.float32)
            above = nm[None, :] & (dd > dap[:, None])
            m1 = tl.min(tl.where(above, dd, float("inf")), axis=1)
            i1 = tl.min(tl.where(above & (dd == m1[:, None]), cols[None, :], M), axis=1)
            any1 = tl.max(above.to(tl.int32), axis=1) > 0
            up1 = any1 & ((ab_i < 0) | (m1 < ab_v))
            ab_v = tl.where(up1, m1, ab_v)
            ab_i = tl.where(up1, i1, ab_i)
            negs = nm[None, :] & (dd == dd)
            m2 = tl.max(tl.where(negs, dd, float("-inf")), axis=1)
            i2 = tl.min(tl.where(negs & (dd == m2[:, None]), cols[None, :], M), axis=1)
            any2 = tl.max(negs.to(tl.int32), axis=1) > 0
            up2 = any2 & ((mx_i < 0) | (m2 > mx_v))
            mx_v = tl.where(up2, m2, mx_v)
            mx_i = tl.where(up2, i2, mx_i)
        has = pm & (mx_i >= 0)
        nstar = tl.where(ab_i >= 0, ab_i, mx_i)
        dstar = tl.where(ab_i >= 0, ab_v, mx_v)
        v = dap - dstar + margin
        s += tl.sum(tl.where(has, tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0), axis=0).to(tl.float64)
        c += tl.sum(has.to(tl.int32), axis=0).to(tl.int64)
        if NEED_GRAD:
            if ONE_BLOCK:
                wpos = tl.where(has & (v > 0), 1.0, 0.0)
                for j0 in range(0, M, BT):
                    cols = j0 + tl.arange(0, BT).to(tl.int64)
                    hit = tl.where(nstar[:, None] == cols[None, :], wpos[:, None], 0.0)
                    tl.store(w_row + cols, -tl.sum(hit, axis=0), mask=cols < M)
                tl.debug_barrier()
                tl.store(w_row + pidx, wpos, mask=pm)
            else:
                # larger classes: the positive's W slot holds its n* (-1: weight 0) until the negatives'
                # weights are summed below
                tl.store(wi_row + pidx, tl.where(has & (v > 0), nstar, -1).to(tl.int32), mask=pm)
    if NEED_GRAD and not ONE_BLOCK:
        tl.debug_barrier()
        # each negative tile's weight: minus the number of positives that chose it, over every positive block,
        # then one plain store on every column but the positives (no read-modify-write of W)
        none = (tl.zeros((BT,), tl.int64) + lo) >= hi  # no positive (no class run, or it takes every column)
        for j0 in range(0, M, BT):
            cols = j0 + tl.arange(0, BT).to(tl.int64)
            cm = cols < M
            zl = tl.load(z_ptr + cols, mask=cm, other=0)
            wn = tl.zeros((BT,), tl.float32)
            for t0 in range(lo, hi, BP):
                ts = t0 + tl.arange(0, BP).to(tl.int64)
                pidx = tl.load(perm_ptr + ts, mask=ts < hi, other=0)
                ns = tl.load(wi_row + pidx, mask=(ts < hi) & (pidx != ex), other=-1).to(tl.int64)
                wn += tl.sum(tl.where(ns[:, None] == cols[None, :], 1.0, 0.0), axis=0)
            tl.store(w_row + cols, -wn, mask=cm & ((zl != ya) | (cols == ex) | none))
        tl.debug_barrier()
        # the positives' weights: [v > 0], read back from their n* slots (every thread that holds a slot reads
        # it before any overwrites it)
        for t0 in range(lo, hi, BP):
            ts = t0 + tl.arange(0, BP).to(tl.int64)
            pidx = tl.load(perm_ptr + ts, mask=ts < hi, other=0)
            pm = (ts < hi) & (pidx != ex)
            ns = tl.load(wi_row + pidx, mask=pm, other=-1)
            tl.debug_barrier()
            tl.store(w_row + pidx, tl.where(ns >= 0, 1.0, 0.0), mask=pm)
    one = tl.arange(0, 1)
    tl.store(part_ptr + 2 * (A0 + pid.to(tl.int64)) + one, s)
    tl.store(part_ptr + 2 * (A0 + pid.to(tl.int64)) + 1 + one, c.to(tl.float64))


@triton.jit(do_not_specialize=["A0", "M", "LD"])
def triplet_list_kernel(
    buf_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    perm_ptr,
    plo_ptr,
    phi_ptr,
    cnt_ptr,
    off_ptr,
    a_ptr,
    p_ptr,
    n_ptr,
    A0,
    M,
    LD,
    band_lo,
    band_hi,
    WRITE: tl.constexpr,
    BP: tl.constexpr,
    BT: tl.constexpr,
):
    pid = tl.program_id(0)
    ya, ex, lo, hi = _anchor_setup(y_ptr, excl_ptr, plo_ptr, phi_ptr, A0, pid, M)
    a = A0 + pid.to(tl.int64)
    buf_row = buf_ptr + pid.to(tl.int64) * LD
    one = tl.arange(0, 1)
    if WRITE:
        base = tl.load(off_ptr + a + one)
    else:
        base = tl.zeros((1,), tl.int64)
    for t0 in range(lo, hi, BP):
        pidx, pm, dap = _positive_block(buf_row, perm_ptr, t0, hi, ex, BP)
        per_p = tl.zeros((BP,), tl.int64)
        for j0 in range(0, M, BT):
            cols, nm = _negative_cols(z_ptr, j0, M, ya, ex, BT)
            dan = tl.load(buf_row + cols, mask=nm, other=0.0)
            sel = _in_band(dap, dan, pm, nm, band_lo, band_hi)
            per_p += tl.sum(sel.to(tl.int32), axis=1).to(tl.int64)
        if WRITE:
            run = base + tl.cumsum(per_p, axis=0) - per_p
            for j0 in range(0, M, BT):
                cols, nm = _negative_cols(z_ptr, j0, M, ya, ex, BT)
                dan = tl.load(buf_row + cols, mask=nm, other=0.0)
                sel = _in_band(dap, dan, pm, nm, band_lo, band_hi).to(tl.int32)
                pos = run[:, None] + (tl.cumsum(sel, axis=1) - sel).to(tl.int64)
                wm = sel != 0
                tl.store(a_ptr + pos, a + tl.zeros((BP, BT), tl.int64), mask=wm)
                tl.store(p_ptr + pos, pidx[:, None] + tl.zeros((BP, BT), tl.int64), mask=wm)
                tl.store(n_ptr + pos, cols[None, :] + tl.zeros((BP, BT), tl.int64), mask=wm)
                run += tl.sum(sel, axis=1).to(tl.int64)
        base += tl.sum(per_p, axis=0)
    if not WRITE:
        tl.store(cnt_ptr + a + one, base)


def _grid_cfg(st, one_block=True):
    c = st.cfg
    # maxnreg=255 only for the block loop of large classes (it spills there at the 128-register cap on
    # Triton 3.9); with it the one-block BP = 512 variants spill on 3.6
    cfg = dict(BP=c["BP"], BT=c["BT"], **(launch_opts(c) if not st.one_block else {"num_warps": c["num_warps"]}))
    if one_block:
        cfg["ONE_BLOCK"] = st.one_block
    return cfg


def _stats_run(p, need_grad, allow_tf32, launch, need_grad_r=True):
    """Common driver: stage each chunk, run the per-anchor kernel, then the gradient passes (the column-side
    pass into gr only with ``need_grad_r``; without it gr_parts is (0, M, D))."""
    st = Stager(p, need_grad, precision(allow_tf32), need_grad_r)
    part = poison((p.n, 2), p.device, torch.float64)
    if need_grad:
        gx, gr = st.grads()
    for k, (a0, ch) in enumerate(st.chunks()):
        with device_guard(p.device):
            launch(st, a0, ch, part)
        if need_grad:
            st.grad_passes(a0, ch, gx, gr, first=(k == 0))
    stats = part.sum(0)
    if need_grad:
        gx_parts, gr_parts = st.finish(gx, gr)
    else:
        gx_parts, gr_parts = empty_parts(p)
    return stats, gx_parts, gr_parts


def triplet_stats_fwd(
    x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high, need_grad, need_grad_r=True, allow_tf32=None
):
    """All-triplet statistics ``[S, C]`` (float64) and the gradient part dS/d(x, r).

    S = sum of counted terms relu(v) (softplus(v) if ``smooth``), v = d'_ip - d'_in + margin, over triplets
    with band_lo < d'_in - d'_ip <= band_hi and low < term < high; C their number. Returns
    ``(stats (2,), gx_parts (1, N, D), gr_parts (1, M, D))`` (see ``contrastive_stats_fwd`` for the
    empty/square shapes and ``need_grad_r``).
    """
    p = prepare(x, y, r, z, excl, kind)
    vals = [
        check_float(nm, v)
        for nm, v in (("margin", margin), ("band_lo", band_lo), ("band_hi", band_hi), ("low", low), ("high", high))
    ]
    smooth = bool(smooth)
    need_grad = bool(need_grad)

    def launch(st, a0, ch, part):
        if p.m == 0:
            part[a0 : a0 + ch].zero_()
            return
        triplet_anchor_kernel[(ch,)](
            st.buf,
            st.w,
            p.y,
            p.z,
            p.excl,
            st.perm,
            st.plo,
            st.phi,
            part,
            a0,
            p.m,
            st.buf.shape[1],
            *vals,
            SMOOTH=smooth,
            NEED_GRAD=need_grad,
            **_grid_cfg(st),
        )

    return _stats_run(p, need_grad, allow_tf32, launch, bool(need_grad_r))


def semihard_stats_fwd(x, y, r, z, excl, kind, margin, need_grad, need_grad_r=True, allow_tf32=None):
    """Semi-hard statistics ``[S, C]`` (float64, TF-Addons ``triplet_semihard_loss``) and dS/d(x, r).

    For each positive pair (i, p) of an anchor with at least one negative: n* = the negative with the
    smallest d'_in > d'_ip, else the one with the largest d'_in (ties: lowest index);
    S = sum relu(d'_ip - d'_in* + margin), C = the number of such pairs.
    """
    p = prepare(x, y, r, z, excl, kind)
    margin = check_float("margin", margin)
    need_grad = bool(need_grad)
    if p.m >= 2**31:
        _fail(ValueError, f"r has {p.m} rows: semihard_stats_fwd takes fewer than 2**31 references")

    def launch(st, a0, ch, part):
        if p.m == 0:
            part[a0 : a0 + ch].zero_()
            return
        semihard_anchor_kernel[(ch,)](
            st.buf,
            st.w,
            st.w.view(torch.int32),
            p.y,
            p.z,
            p.excl,
            st.perm,
            st.plo,
            st.phi,
            part,
            a0,
            p.m,
            st.buf.shape[1],
            margin,
            NEED_GRAD=need_grad,
            **_grid_cfg(st),
        )

    return _stats_run(p, need_grad, allow_tf32, launch, bool(need_grad_r))


def triplet_list(x, y, r, z, excl, kind, band_lo, band_hi, allow_tf32=None):
    """Triplets (a, p, n) with band_lo < d'_an - d'_ap <= band_hi, int64, PML's lexicographic order."""
    p = prepare(x, y, r, z, excl, kind)
    band_lo = check_float("band_lo", band_lo)
    band_hi = check_float("band_hi", band_hi)
    dev = p.device
    empty = torch.empty(0, device=dev, dtype=torch.int64)
    if p.n == 0 or p.m == 0:
        return empty, empty.clone(), empty.clone()
    st = Stager(p, False, precision(allow_tf32))
    cnt = torch.full((p.n,), -1, device=dev, dtype=torch.int64)
    dummy = torch.empty(1, device=dev, dtype=torch.int64)
    chunks = []
    # count pass (the staged rows are recomputed in the write pass: the staging costs O(CH M D) per chunk,
    # far less than the compares, and the budget holds one chunk at a time)
    for a0, ch in st.chunks():
        with device_guard(dev):
            triplet_list_kernel[(ch,)](
                st.buf,
                p.y,
                p.z,
                p.excl,
                st.perm,
                st.plo,
                st.phi,
                cnt,
                dummy,
                dummy,
                dummy,
                dummy,
                a0,
                p.m,
                st.buf.shape[1],
                band_lo,
                band_hi,
                WRITE=False,
                **_grid_cfg(st),
            )
        chunks.append((a0, ch))
    off = (torch.cumsum(cnt, 0) - cnt).contiguous()
    total = int(cnt.sum().item())
    if total < 0:
        _fail(RuntimeError, "triplet count overflow")
    out = [torch.full((max(total, 1),), -1, device=dev, dtype=torch.int64) for _ in range(3)]
    for a0, ch in st.chunks():
        with device_guard(dev):
            triplet_list_kernel[(ch,)](
                st.buf,
                p.y,
                p.z,
                p.excl,
                st.perm,
                st.plo,
                st.phi,
                cnt,
                off,
                out[0],
                out[1],
                out[2],
                a0,
                p.m,
                st.buf.shape[1],
                band_lo,
                band_hi,
                WRITE=True,
                **_grid_cfg(st),
            )
    return tuple(o[:total] for o in out)

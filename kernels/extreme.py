"""Row extremes (batch-hard mining and the threshold-based miners): ``row_extreme``.

For each query i, over j in P(i) (``side="pos"``) or Q(i) (``side="neg"``) with ``lo <= d'_ij <= hi`` and,
when ``thr`` is given, ``d'_ij > thr_i`` (``thr_op="gt"``) or ``d'_ij < thr_i`` (``"lt"``): the max or min
d'_ij and its index j, ties to the lowest index (PML's argmax/argmin). ``found`` is False where nothing
qualifies (value and index are then 0).

One program owns a block of query rows and sweeps the column tiles in increasing order, keeping the running
extreme and its index in registers: strict comparisons across tiles keep the earlier (lower) index on ties,
and inside a tile the lowest index among the entries equal to the tile's extreme is taken. Few row blocks:
the columns are cut into contiguous ranges, one program per (row block, range), and the partials merged in
torch with ties to the lowest index (``_common.column_split``, ``merge_extremes``). Deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _fail,
    autotuned,
    check_float,
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

_SIDES = {"pos": 0, "neg": 1}
_MODES = {"max": 0, "min": 1}
_THR_OPS = {"": 0, "gt": 1, "lt": 2}


@triton.jit(do_not_specialize=["N", "M", "SPAN"])
def row_extreme_kernel(
    x_ptr,
    r_ptr,
    xn_ptr,
    rn_ptr,
    y_ptr,
    z_ptr,
    excl_ptr,
    thr_ptr,
    val_ptr,
    idx_ptr,
    found_ptr,
    N,
    M,
    D,
    lo,
    hi,
    SPAN,
    KIND: tl.constexpr,
    SIDE: tl.constexpr,
    MODE: tl.constexpr,
    THR_OP: tl.constexpr,
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
    if THR_OP != 0:
        thr = tl.load(thr_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if MODE == 0:
        best = tl.full((BM,), float("-inf"), tl.float32)
    else:
        best = tl.full((BM,), float("inf"), tl.float32)
    bidx = tl.zeros((BM,), tl.int64)
    found = rows < 0
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
        if SIDE == 0:
            ok = ok & same
        else:
            ok = ok & (~same)
        ok = ok & (dp >= lo) & (dp <= hi)
        if THR_OP == 1:
            ok = ok & (dp > thr[:, None])
        elif THR_OP == 2:
            ok = ok & (dp < thr[:, None])
        best, bidx, found = running_extreme(ok, dp, cols, best, bidx, found, c1, MODE == 0)
    tl.store(val_ptr + out, tl.where(found, best, 0.0), mask=rmask)
    tl.store(idx_ptr + out, tl.where(found, bidx, 0), mask=rmask)
    tl.store(found_ptr + out, found.to(tl.int8), mask=rmask)


def row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op, allow_tf32=None):
    """Per-query extreme of d' over the positives or negatives in a band: ``(value f32, index i64, found)``.

    See the module docstring for the exact selection; ``lo``/``hi`` are inclusive bounds (may be +-inf),
    ``thr`` an optional (N,) per-query threshold applied with ``thr_op`` ("gt" or "lt").
    """
    p = prepare(x, y, r, z, excl, kind)
    if side not in _SIDES:
        _fail(ValueError, f"side must be 'pos' or 'neg', got {side!r}")
    if mode not in _MODES:
        _fail(ValueError, f"mode must be 'max' or 'min', got {mode!r}")
    thr_op = thr_op or ""
    if thr_op not in _THR_OPS:
        _fail(ValueError, f"thr_op must be 'gt', 'lt' or '', got {thr_op!r}")
    lo = check_float("lo", lo)
    hi = check_float("hi", hi)
    if thr is None:
        if thr_op != "":
            _fail(ValueError, f"thr_op={thr_op!r} needs a thr tensor")
        thr_t = p.xn  # never read
    else:
        if thr_op == "":
            _fail(ValueError, "thr is given but thr_op is ''; use 'gt' or 'lt'")
        if not isinstance(thr, torch.Tensor) or thr.shape != (p.n,):
            _fail(
                ValueError,
                f"thr must be a tensor of shape ({p.n},), got "
                f"{tuple(thr.shape) if isinstance(thr, torch.Tensor) else type(thr).__name__}",
            )
        if thr.device != p.device:
            _fail(ValueError, f"thr is on {thr.device} but x is on {p.device}")
        if not thr.is_floating_point():
            _fail(TypeError, f"thr must be floating point, got {thr.dtype}")
        thr_t = thr.detach().float().contiguous()
    if p.n == 0:
        return merge_extremes(*extreme_outputs(0, p.device), mode == "max")
    prec = precision(allow_tf32)

    def run(cfg):
        rows = triton.cdiv(p.n, cfg["BM"])
        splits, span = column_split(rows, p.m, cfg["BN"], p.device)
        val, idx, found = extreme_outputs(p.n, p.device, splits)
        with device_guard(p.device):
            row_extreme_kernel[(rows, splits)](
                p.x,
                p.r,
                p.xn,
                p.rn,
                p.y,
                p.z,
                p.excl,
                thr_t,
                val,
                idx,
                found,
                p.n,
                p.m,
                p.d,
                lo,
                hi,
                span,
                KIND=p.kind_id,
                SIDE=_SIDES[side],
                MODE=_MODES[mode],
                THR_OP=_THR_OPS[thr_op],
                PREC=prec,
                UPCAST=p.upcast,
                NEAR=near_fraction(prec),
                **cfg,
            )
        return val, idx, found

    cfg = autotuned(tune_key("row_extreme", p, prec), extreme_configs(p.d, p.x.dtype, prec), run, p.device)
    return merge_extremes(*run(cfg), mode == "max")

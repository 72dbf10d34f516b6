"""Staging for the triplet-shaped ops: d' of a chunk of anchors, positives as index ranges, gradient passes.

The triplet ops (batch-all, semi-hard, triplet listing) compare, per anchor, every positive with every
negative: O(N K M) compares that each need two d' values. Recomputing d' inside that loop would cost
O(N K M D); instead each chunk of anchors gets its d' rows staged once in a (CH, M) fp32 buffer by a
GEMM-shaped kernel (O(CH M D), same precision handling as every other kernel), and the per-anchor kernels
read them. CH (any number of rows, down to 1) is chosen so that the staging buffers (d' and, with a
gradient, W: 4 or 8 bytes per anchor and reference) stay under ``stage_bytes()`` (256 MB by default,
``FASTDML_TRITON_STAGE_MB``): peak extra memory is bounded, independent of N, except that one row must fit
(a single row of M references over the budget is staged anyway). The staging buffer is not pre-filled:
the staging kernel writes every in-range entry.

Positives are enumerated without scanning all M columns: the references are sorted by label once
(stable argsort, so each class's members stay in ascending index order) and anchor i's positives are
``perm[lo_i:hi_i]`` (``searchsorted``); negatives are scanned in natural column order (label mask), which
keeps PML's index order for the listing miner.

Gradients: the per-anchor kernels write pair weights W (CH, M) (dS/dd'_ij; rows owned by one program, so
no atomics), then two GEMM-shaped passes turn W into gradients with the common helper: a row pass
(programs own anchor rows, writes gx) and a column pass (programs own reference rows, adds the chunk's
contribution to gr; chunks run in stream order, so the sum is deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (
    block_d,
    device_guard,
    dprime_tile,
    grad_finish,
    grad_group,
    grad_tile,
    interpreting,
    near_fraction,
    pair_coef,
    poison,
    target_ctas,
)

_STAGE_OVERRIDE: list[int] = []
# the largest class whose positives one per-anchor program holds at once, and the tile size BP x BT
MAX_ONE_BLOCK = 1024
BP_BT = 4096


def stage_bytes() -> int:
    """Budget for the staging buffers of one chunk of anchors, in bytes."""
    if _STAGE_OVERRIDE:
        return _STAGE_OVERRIDE[-1]
    raw = os.environ.get("FASTDML_TRITON_STAGE_MB", "").strip()
    try:
        mb = float(raw) if raw else 256.0
    except ValueError as exc:
        raise ValueError(f"FASTDML_TRITON_STAGE_MB must be a number of megabytes, got {raw!r}") from exc
    if not mb > 0:
        raise ValueError(f"FASTDML_TRITON_STAGE_MB must be positive, got {raw!r}")
    return int(mb * 2**20)


def chunk_rows(n: int, m: int, need_grad: bool, budget: int) -> int:
    """Anchor rows per chunk: the most rows whose staged d' (and W with a gradient) fit ``budget`` bytes,
    at least 1 and at most n."""
    per_row = max(1, m) * 4 * (2 if need_grad else 1)
    return max(1, min(max(n, 1), budget // per_row))


def config(d):
    if interpreting():
        return dict(BM=32, BN=64, BK=block_d(d), BG=grad_group(d), SUBK=16, BP=32, BT=64, num_warps=4)
    # one (BM, BG) accumulator in wpass_kernel; maxnreg=255 lifts the 128 (or 64) register cap ptxas put on
    # some 8-warp programs (a spill on Triton 3.6), and 16-wide D chunks keep stage_dist_kernel's fp32 ieee
    # dot under 255 (32: a spill on 3.9); checked spill-free by bench/compile_check.py
    return dict(BM=64, BN=32, BK=16, BG=min(64, grad_group(d)), SUBK=1, BP=32, BT=64, num_warps=8, maxnreg=255)


def launch_opts(c) -> dict:
    """The compiler options of config ``c``: num_warps, and maxnreg where the config sets one."""
    return {k: c[k] for k in ("num_warps", "maxnreg") if k in c}


@triton.jit(do_not_specialize=["A0", "CH", "M"])
def stage_dist_kernel(
    x_ptr,
    r_ptr,
    xn_ptr,
    rn_ptr,
    buf_ptr,
    A0,
    CH,
    M,
    D,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    NEAR: tl.constexpr,
):
    """buf[i, j] = d'(x[A0 + i], r[j]) for i < CH, j < M.

    One grid axis (row block major): CUDA's second grid axis stops at 65,535 blocks, i.e. M ~ 2.1M at BN = 32.
    """
    pid = tl.program_id(0).to(tl.int64)
    nb = tl.cdiv(M, BN)
    loc = (pid // nb) * BM + tl.arange(0, BM).to(tl.int64)
    lmask = loc < CH
    rows = A0 + loc
    cols = (pid % nb) * BN + tl.arange(0, BN).to(tl.int64)
    cmask = cols < M
    dp, near = dprime_tile(
        x_ptr, r_ptr, xn_ptr, rn_ptr, rows, lmask, cols, cmask, D, KIND, BM, BN, BK, SUBK, PREC, UPCAST, NEAR
    )
    tl.store(buf_ptr + loc[:, None] * M + cols[None, :], dp, mask=lmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["N_OWN", "N_OTH", "OWN0", "OTH0", "S_OWN", "S_OTH"])
def wpass_kernel(
    own_ptr,
    oth_ptr,
    ownn_ptr,
    othn_ptr,
    buf_ptr,
    w_ptr,
    near_ptr,
    out_ptr,
    N_OWN,
    N_OTH,
    OWN0,
    OTH0,
    S_OWN,
    S_OTH,
    D,
    scale,
    KIND: tl.constexpr,
    ACCUM: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BG: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
    NEAR: tl.constexpr,
):
    """out[own rows] (+)= scale * sum_j c_ij (own_i - oth_j) over the staged chunk (dot: -sum_j w_ij oth_j).

    Own row ``OWN0 + i`` and other row ``OTH0 + j`` have d' at ``buf[i * S_OWN + j * S_OTH]`` and weight
    ``w`` at the same place, so the same kernel does the row pass (S_OWN = M, S_OTH = 1) and the column pass
    (S_OWN = 1, S_OTH = M) over a chunk.
    """
    loc = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    lmask = loc < N_OWN
    rows = OWN0 + loc
    g0 = tl.program_id(1).to(tl.int64) * BG
    acc = tl.zeros((BM, BG), tl.float32)
    rs = tl.zeros((BM,), tl.float32)
    if KIND != 2:
        ownn = tl.load(ownn_ptr + rows, mask=lmask, other=0.0)
    for j0 in range(0, N_OTH, BN):
        cl = j0 + tl.arange(0, BN).to(tl.int64)
        cmask = cl < N_OTH
        cols = OTH0 + cl
        inb = lmask[:, None] & cmask[None, :]
        offs = loc[:, None] * S_OWN + cl[None, :] * S_OTH
        w = tl.load(w_ptr + offs, mask=inb, other=0.0)
        dp = tl.load(buf_ptr + offs, mask=inb, other=1.0)
        if KIND == 2:
            near = inb & (dp != dp)
        else:
            othn = tl.load(othn_ptr + cols, mask=cmask, other=0.0)
            if KIND == 0:
                q = dp * dp
            else:
                q = dp
            near = inb & (q < NEAR * (ownn[:, None] + othn[None, :]))
        acc, rs = grad_tile(
            acc,
            rs,
            pair_coef(w, dp, KIND),
            near,
            own_ptr,
            oth_ptr,
            near_ptr,
            rows,
            lmask,
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
    grad_finish(acc, rs, own_ptr, near_ptr, out_ptr, rows, lmask, g0, D, scale, KIND, BG, KIND != 2, ACCUM)


class Stager:
    """Chunks of anchors with their staged d' rows and weight rows W (neither is filled: the staging kernel
    writes every d' entry of the chunk and the per-anchor kernels every W entry)."""

    def __init__(self, p, need_grad, prec, need_grad_r=True):
        self.p = p
        self.need_grad = need_grad
        # rectangular references that need no gradient: no column-side pass, gr_parts (0, M, D)
        self.need_grad_r = bool(need_grad_r) or p.square
        self.prec = prec
        self.cfg = config(p.d)
        dev = p.device
        # positives of anchor i: perm[plo[i]:phi[i]] (sorted by label, stable)
        zs, perm = torch.sort(p.z, stable=True)
        self.perm = perm.contiguous()
        self.plo = torch.searchsorted(zs, p.y, right=False).contiguous()
        self.phi = torch.searchsorted(zs, p.y, right=True).contiguous()
        # positive tile: the largest class, whole when it has at most MAX_ONE_BLOCK members (then W is written
        # by plain stores: ``one_block``), and the negative tile narrowed to keep BP x BT = BP_BT elements
        kmax = int((self.phi - self.plo).max()) if p.n > 0 else 0
        self.one_block = kmax <= MAX_ONE_BLOCK
        if self.one_block:
            self.cfg["BP"] = max(16, triton.next_power_of_2(max(kmax, 1)))
            self.cfg["BT"] = max(16, min(self.cfg["BT"], BP_BT // self.cfg["BP"]))
        elif not interpreting():
            self.cfg["BP"] = 32  # BP = 64 spills in semihard_anchor_kernel on sm_90 (Triton 3.9)
        self.ch = chunk_rows(p.n, p.m, need_grad, stage_bytes())
        self.buf = torch.empty((self.ch, max(1, p.m)), device=dev, dtype=torch.float32)
        self.w = torch.empty(self.buf.shape, device=dev, dtype=torch.float32) if need_grad else self.buf
        if need_grad and p.kind_id != 2:
            self.near_x = torch.zeros((p.n, p.d), device=dev, dtype=torch.float32)
            self.near_r = torch.zeros((p.m if self.need_grad_r else 0, p.d), device=dev, dtype=torch.float32)
        else:
            self.near_x = self.near_r = self.buf

    def chunks(self):
        """Yield (a0, ch): the buffer holds d'(x[a0 + i], r[j]) for i < ch when yielded."""
        p = self.p
        for a0 in range(0, p.n, self.ch):
            ch = min(self.ch, p.n - a0)
            if p.m > 0:
                with device_guard(p.device):
                    self._stage(a0, ch)
            yield a0, ch

    def _stage(self, a0, ch):
        p, c = self.p, self.cfg
        stage_dist_kernel[(triton.cdiv(ch, c["BM"]) * triton.cdiv(p.m, c["BN"]),)](
            p.x,
            p.r,
            p.xn,
            p.rn,
            self.buf,
            a0,
            ch,
            p.m,
            p.d,
            KIND=p.kind_id,
            BM=c["BM"],
            BN=c["BN"],
            BK=c["BK"],
            SUBK=c["SUBK"],
            PREC=self.prec,
            UPCAST=p.upcast,
            NEAR=near_fraction(self.prec),
            **launch_opts(c),
        )

    def grad_passes(self, a0, ch, gx, gr, first):
        """Turn the chunk's weights into gradients: gx rows [a0, a0 + ch) written, gr (all M rows) added."""
        p, c = self.p, self.cfg
        groups = triton.cdiv(p.d, c["BG"])
        common = dict(
            KIND=p.kind_id,
            BN=c["BN"],
            BG=c["BG"],
            SUBK=c["SUBK"],
            PREC=self.prec,
            NEAR=near_fraction(self.prec),
            **launch_opts(c),
        )
        with device_guard(p.device):
            self._wpasses(a0, ch, gx, gr, first, groups, common)

    def wpass_bm(self, rows, groups):
        """Row block of the gradient passes: the largest of 64, 32, 16 (tl.dot needs 16) that still gives
        ``target_ctas`` programs for ``rows`` own rows and ``groups`` D groups (fewer rows: smaller blocks)."""
        if interpreting():
            return self.cfg["BM"]
        for bm in (64, 32):
            if triton.cdiv(rows, bm) * groups >= target_ctas(self.p.device):
                return bm
        return 16

    def _wpasses(self, a0, ch, gx, gr, first, groups, common):
        p = self.p
        bm = self.wpass_bm(ch, groups)
        wpass_kernel[(triton.cdiv(ch, bm), groups)](
            p.x,
            p.r,
            p.xn,
            p.rn,
            self.buf,
            self.w,
            self.near_x,
            gx,
            ch,
            p.m,
            a0,
            0,
            self.buf.shape[1],
            1,
            p.d,
            1.0,
            ACCUM=False,
            BM=bm,
            **common,
        )
        if p.m == 0 or not self.need_grad_r:
            return
        if self.near_r is not self.buf:
            self.near_r.zero_()
        bm = self.wpass_bm(p.m, groups)
        wpass_kernel[(triton.cdiv(p.m, bm), groups)](
            p.r,
            p.x,
            p.rn,
            p.xn,
            self.buf,
            self.w,
            self.near_r,
            gr,
            p.m,
            ch,
            0,
            a0,
            1,
            self.buf.shape[1],
            p.d,
            1.0,
            ACCUM=not first,
            BM=bm,
            **common,
        )

    def grads(self):
        p = self.p
        gx = poison((p.n, p.d), p.device)
        gr = poison((p.m if self.need_grad_r else 0, p.d), p.device)
        return gx, gr

    def finish(self, gx, gr):
        """(gx_parts, gr_parts) in the contract's shapes; square case: the column side lands on x."""
        p = self.p
        if p.m > 0 and p.n == 0:
            gr.zero_()  # (a no-op on the empty gr of need_grad_r=False)
        if p.square:
            return (gx + gr).unsqueeze(0), torch.empty((0, 0, p.d), device=p.device, dtype=torch.float32)
        if not self.need_grad_r:
            return gx.unsqueeze(0), torch.empty((0, p.m, p.d), device=p.device, dtype=torch.float32)
        return gx.unsqueeze(0), gr.unsqueeze(0)


def empty_parts(p):
    return (
        torch.empty((0, p.n, p.d), device=p.device, dtype=torch.float32),
        torch.empty((0, 0 if p.square else p.m, p.d), device=p.device, dtype=torch.float32),
    )

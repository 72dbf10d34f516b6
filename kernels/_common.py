"""Shared pieces of the Triton kernels: input validation, launch settings and the distance tile.

Every launcher goes through :func:`prepare`, which checks the arguments (clear errors naming the argument),
makes the inputs contiguous and computes the squared row norms once in fp32 (PyTorch, O(N D)).

The jit helpers compute one tile of the signed distance d' (ARCHITECTURE.md):

- ``l2``:   d' = sqrt(max(q, 0)),  q = |x|^2 + |r|^2 - 2 x.r
- ``sql2``: d' = max(q, 0)
- ``dot``:  d' = -(x . r)

with ``tl.dot`` over chunks of D (``input_precision`` from :func:`precision`: ``fastdml.config``'s fp32
precision, ``ieee | tf32x3 | tf32``). The expansion of q cancels for near-duplicates (q small against
s = |x|^2 + |r|^2), so every entry with ``q < f_p s`` ("near", f_p = :func:`near_fraction` of the precision)
is recomputed by direct differences sum_k (x_k - r_k)^2, only in the tiles that hold such an entry (rare
outside genuine near-duplicates; the excluded diagonal of the square case is one tile per row block).
The gradient helpers treat near entries by direct differences too, because
the GEMM form ``(sum_j c_ij) x_i - sum_j c_ij r_j`` cancels the same way when c = g / d is large.
"""

from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

KINDS = {"l2": 0, "sql2": 1, "dot": 2}
PRECISIONS = ("ieee", "tf32x3", "tf32")

# Error of q = s - 2 x.r per unit of s = |x|^2 + |r|^2, per precision: ieee 16 u32 (u32 = 2^-24; checked in
# tests/test_kernels_gpu_path.py), tf32x3 adds the dropped lo*lo product, 3 u_t^2 (u_t = 2^-11), and tf32
# rounds each operand to 10 bits, 2 u_t (the table in docs/gpu.md).
EXPANSION_ERROR = {"ieee": 16 * 2.0**-24, "tf32x3": 16 * 2.0**-24 + 3 * 2.0**-22, "tf32": 2.0**-10}
# Target relative error of q on the entries not recomputed ("far": q >= f s): |dq| / q <= E / f.
NEAR_RHO = 1e-4


# Sizes and offsets (N, M, chunk starts) are not specialized by the kernels (``do_not_specialize``): a new
# batch size must not trigger a new compilation; D (the row stride) is, for aligned vector loads.


def interpreting() -> bool:
    """True under the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _cpu_ok() -> bool:
    # CPU tensors run only under the interpreter (bench/compile_check.py patches this to compile on a CPU box)
    return interpreting()


def _fail(exc, msg):
    raise exc(f"fastdml.kernels: {msg}")


def check_kind(kind):
    if kind not in KINDS:
        _fail(ValueError, f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    return KINDS[kind]


def _check_embeddings(name, t, device=None, dtype=None, dim=None):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        _fail(ValueError, f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.dtype == torch.float64:
        _fail(TypeError, f"{name} is float64, which the Triton kernels do not take (use the blocked backend)")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(TypeError, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.shape[1] < 1:
        _fail(ValueError, f"{name} must have at least one column, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(ValueError, f"{name} is on {t.device} but x is on {device}")
    if dtype is not None and t.dtype != dtype:
        _fail(TypeError, f"{name} has dtype {t.dtype} but x has {dtype}")
    if dim is not None and t.shape[1] != dim:
        _fail(ValueError, f"{name} has {t.shape[1]} columns but x has {dim}")
    # the kernels read raw memory: no autograd graph (the op layer owns the backward), row-major layout
    return t.detach().contiguous()


def _check_index(name, t, length, device, what):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        _fail(ValueError, f"{name} must have shape ({length},) ({what}), got {tuple(t.shape)}")
    if t.dtype != torch.int64:
        _fail(TypeError, f"{name} must be int64, got {t.dtype}")
    if t.device != device:
        _fail(ValueError, f"{name} is on {t.device} but x is on {device}")
    return t.contiguous()


def prepare(x, y, r, z, excl, kind):
    """Validate the common arguments; return a namespace with contiguous tensors and fp32 row norms.

    Square case (``r is None``): ``z`` and ``excl`` must be None; the kernels then see ``r = x``, ``z = y``
    and ``excl = arange(N)`` (the diagonal pair excluded).
    """
    kind_id = check_kind(kind)
    x = _check_embeddings("x", x)
    dev = x.device
    if dev.type != "cuda" and not _cpu_ok():
        _fail(ValueError, f"x is on {dev}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    n, d = x.shape
    y = _check_index("y", y, n, dev, "one label per row of x")
    square = r is None
    if square:
        if z is not None:
            _fail(ValueError, "z must be None when r is None (square case)")
        if excl is not None:
            _fail(ValueError, "excl must be None when r is None (square case: the diagonal is excluded)")
        r, z = x, y
        excl_t = torch.arange(n, device=dev, dtype=torch.int64)
    else:
        r = _check_embeddings("r", r, dev, x.dtype, d)
        if z is None:
            _fail(ValueError, "z (reference labels) must be given with r")
        z = _check_index("z", z, r.shape[0], dev, "one label per row of r")
        if excl is None:
            excl_t = torch.full((n,), -1, device=dev, dtype=torch.int64)
        else:
            excl_t = _check_index("excl", excl, n, dev, "one excluded reference index per query, -1: none")
    m = r.shape[0]
    xn = x.float().pow(2).sum(1).contiguous()
    rn = xn if square else r.float().pow(2).sum(1).contiguous()
    return SimpleNamespace(
        x=x,
        y=y,
        r=r,
        z=z,
        excl=excl_t,
        kind=kind,
        kind_id=kind_id,
        square=square,
        n=n,
        m=m,
        d=d,
        xn=xn,
        rn=rn,
        device=dev,
        upcast=_upcast(x.dtype),
    )


def _upcast(dtype) -> bool:
    # fp32 always dots in fp32. fp16/bf16 dot natively (tensor cores, fp32 accumulation) on a GPU, but the
    # interpreter's bf16 arithmetic is broken, so it upcasts right after the load there.
    return dtype == torch.float32 or interpreting()


def check_float(name, v, allow_nan=False):
    try:
        f = float(v)
    except (TypeError, ValueError):
        _fail(TypeError, f"{name} must be a float, got {v!r}")
    if math.isnan(f) and not allow_nan:
        _fail(ValueError, f"{name} must not be NaN")
    return f


def block_d(d: int) -> int:
    """Width of the D chunks: a power of two in [16, 64] (tl.dot needs K >= 16)."""
    return max(16, min(64, triton.next_power_of_2(d)))


def grad_group(d: int) -> int:
    """Width of a gradient D group held in registers (one program per group): a power of two in [16, 128]."""
    return max(16, min(128, triton.next_power_of_2(d)))


def poison(shape, device, dtype=torch.float32):
    """An output buffer filled with NaN, so that an entry a kernel forgot to write shows up in the tests."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def precision(allow_tf32=None, dtype=None) -> str:
    """The ``input_precision`` of the fp32 ``tl.dot``: ``"tf32"`` when ``allow_tf32`` is True, ``"ieee"`` when
    it is False, else ``fastdml.config.fp32_precision()`` (thread-local override, ``FASTDML_FP32_PRECISION``,
    default ieee). Always ``"ieee"`` on ROCm (``torch.version.hip``). It applies to fp32 operands: the
    distance dot of fp16/bf16 inputs stays their native one (``dprime_tile``), their gradient dots (fp32
    weights) follow it."""
    if allow_tf32 is not None:
        name = "tf32" if allow_tf32 else "ieee"
    else:
        from fastdml import config

        name = config.fp32_precision()
    if name not in PRECISIONS:
        _fail(ValueError, f"fp32 precision must be one of {PRECISIONS}, got {name!r}")
    if getattr(torch.version, "hip", None):
        return "ieee"
    return name


def near_fraction(prec: str) -> float:
    """f_p of the near-duplicate test ``q < f_p s``: entries below it are recomputed by direct differences
    (exact up to fp32 rounding of the differences); above it the expansion's error E_p s is at most
    E_p / f_p of q. f_p = clamp(E_p / NEAR_RHO, 1e-2, 0.5), NEAR_RHO = 1e-4: ieee 1e-2 (far entries within
    ~1e-4 of q, 5e-5 of d), tf32x3 ~1.7e-2 (1e-4), tf32 0.5 (tf32 cannot reach NEAR_RHO without recomputing
    everything: at the cap its far entries keep ~2e-3 relative error in q, about tf32's own operand rounding).
    """
    return min(0.5, max(1e-2, EXPANSION_ERROR[prec] / NEAR_RHO))


def device_guard(device):
    """``torch.cuda.device(device)`` for a CUDA tensor's device (a launch goes to the tensor's GPU, not the
    current one), a no-op context otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def target_ctas(device) -> int:
    """How many programs a sweep aims to launch: two per multiprocessor on CUDA (264 on an H100 where the
    device cannot be asked); 48 under the interpreter (enough to exercise the column-split merge)."""
    if interpreting():
        return 48
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 264


def column_split(row_programs: int, m: int, bn: int, device) -> tuple[int, int]:
    """``(splits, span)``: the reference columns cut into ``splits`` contiguous ranges of ``span`` columns (a
    multiple of ``bn``) so that row_programs x splits reaches :func:`target_ctas`; 1 split when the row
    blocks alone do."""
    tiles = max(1, triton.cdiv(m, bn))
    want = max(1, min(tiles, triton.cdiv(target_ctas(device), max(1, row_programs))))
    span = triton.cdiv(tiles, want) * bn
    return max(1, triton.cdiv(m, span)), span


def merge_extremes(val, idx, found, maximize: bool):
    """Merge per-split running extremes ``(S, N)`` (splits in increasing column order) into ``(N,)``: the best
    value over the splits that found one, ties to the earliest split (so the lowest index); a NaN best (a
    NaN row) takes the first split that found anything, so the index stays in range."""
    f = found == 1
    if val.shape[0] == 1:
        return val[0], idx[0], f[0]
    fill = float("-inf") if maximize else float("inf")
    v = torch.where(f, val, torch.full_like(val, fill))
    best = v.amax(0) if maximize else v.amin(0)
    hit = f & (v == best)
    hit = torch.where(hit.any(0, keepdim=True), hit, f)
    s = hit.to(torch.int8).argmax(0, keepdim=True)  # the first split that attains it
    return val.gather(0, s)[0], idx.gather(0, s)[0], f.any(0)


# ----------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def load_rows(ptr, rows, rmask, k0, D, BK: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` (int64), columns [k0, k0 + BK) of a (rows, D) matrix; zero outside."""
    kk = k0 + tl.arange(0, BK)
    t = tl.load(ptr + rows[:, None] * D + kk[None, :], mask=rmask[:, None] & (kk[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def direct_q(x_ptr, r_ptr, rows, rmask, cols, cmask, D, BM: tl.constexpr, BN: tl.constexpr, SUBK: tl.constexpr):
    """sum_k (x_ik - r_jk)^2 for a (BM, BN) tile by direct differences, in fp32 (exact for near-duplicates)."""
    q = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, SUBK):
        kk = k0 + tl.arange(0, SUBK)
        km = kk < D
        a = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(r_ptr + cols[:, None] * D + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        diff = a.to(tl.float32)[:, None, :] - b.to(tl.float32)[None, :, :]
        q += tl.sum(diff * diff, axis=2)
    return q


@triton.jit
def dprime_tile(
    x_ptr,
    r_ptr,
    xn_ptr,
    rn_ptr,
    rows,
    rmask,
    cols,
    cmask,
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
    """The (BM, BN) tile of d' and the mask of its "near" entries (recomputed by direct differences).

    Out-of-range rows/columns hold garbage and must be masked by the caller.
    """
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, BK):
        a = load_rows(x_ptr, rows, rmask, k0, D, BK, UPCAST)
        b = load_rows(r_ptr, cols, cmask, k0, D, BK, UPCAST)
        if UPCAST:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, tl.trans(b), acc)  # fp16/bf16 operands: native tensor-core dot, fp32 accumulation
    inb = rmask[:, None] & cmask[None, :]
    if KIND == 2:
        dp = -acc
        near = inb & (acc != acc)  # never near (NaN-free inputs): the dot kind has no cancellation issue
    else:
        xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
        rn = tl.load(rn_ptr + cols, mask=cmask, other=0.0)
        s = xn[:, None] + rn[None, :]
        q = s - 2.0 * acc
        near = inb & (q < NEAR * s)
        if tl.max(near.to(tl.int32)) > 0:
            qd = direct_q(x_ptr, r_ptr, rows, rmask, cols, cmask, D, BM, BN, SUBK)
            q = tl.where(near, qd, q)
        q = tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL)  # clamp rounding, keep NaN
        if KIND == 0:
            dp = tl.sqrt(q)
        else:
            dp = q
    return dp, near


@triton.jit
def query_rows(pid, N, y_ptr, excl_ptr, BM: tl.constexpr):
    """The block of query rows program ``pid`` owns (int64 offsets), their mask, labels and excluded
    reference (-1: none)."""
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N
    yl = tl.load(y_ptr + rows, mask=rmask, other=0)
    ex = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    return rows, rmask, yl, ex


@triton.jit
def labelled_tile(
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
    """One (BM, BN) tile of a row-owned sweep of queries ``rows`` (labels ``yl``, excluded reference ``ex``)
    over references ``j0 .. j0 + BN``: ``(cols, d', valid, same)`` where ``valid`` marks in-range pairs other
    than the query's excluded one and ``same`` the pairs whose labels agree."""
    cols = j0 + tl.arange(0, BN).to(tl.int64)
    cmask = cols < M
    zl = tl.load(z_ptr + cols, mask=cmask, other=0)
    dp, near = dprime_tile(
        x_ptr, r_ptr, xn_ptr, rn_ptr, rows, rmask, cols, cmask, D, KIND, BM, BN, BK, SUBK, PREC, UPCAST, NEAR
    )
    ok = rmask[:, None] & cmask[None, :] & (ex[:, None] != cols[None, :])
    same = yl[:, None] == zl[None, :]
    return cols, dp, ok, same


@triton.jit
def running_extreme(ok, dp, cols, best, bidx, found, M, MAXIMIZE: tl.constexpr):
    """Fold one tile into a per-row running extreme of d' over the entries ``ok``: ``(best, index, found)``.

    Tiles come in increasing column order and a later tile wins only when strictly better, so ties keep the
    earlier (lower) index; inside the tile the lowest column among the entries equal to its extreme is taken.
    """
    any_ok = tl.max(ok.to(tl.int32), axis=1) > 0
    if MAXIMIZE:
        m = tl.max(tl.where(ok, dp, float("-inf")), axis=1)
        better = any_ok & ((~found) | (m > best))
    else:
        m = tl.min(tl.where(ok, dp, float("inf")), axis=1)
        better = any_ok & ((~found) | (m < best))
    at = tl.min(tl.where(ok & (dp == m[:, None]), cols[None, :], M), axis=1)
    # a NaN extreme equals no entry: take the lowest eligible column, so a found index is always in range
    at = tl.where(at < M, at, tl.min(tl.where(ok, cols[None, :], M), axis=1))
    return tl.where(better, m, best), tl.where(better, at, bidx), found | any_ok


def extreme_outputs(n: int, device, splits: int = 1):
    """Poisoned per-split outputs ``(splits, n)`` of one running extreme: value NaN, index -1, found 2 (a row
    the kernel does not write reads as not found and is caught by the tests)."""
    return (
        poison((splits, n), device),
        torch.full((splits, n), -1, device=device, dtype=torch.int64),
        torch.full((splits, n), 2, device=device, dtype=torch.int8),
    )


def extreme_configs(d: int, dtype=torch.float32, prec: str = "ieee") -> list[dict]:
    """Candidate launch configurations of the row-owned extreme sweeps (``row_extreme``, ``row_hardest``),
    the first the default: one under the interpreter; on CUDA a small set per (D bucket, dtype, precision)
    that :func:`autotuned` times once per (kernel, D bucket, dtype, kind, precision). Every candidate is
    compiled and checked spill-free on sm_90 by bench/compile_check.py (it lists each one).

    Besides the default (64 x 32 tiles, 8 warps): 32 x 16 tiles with 4 warps in every bucket (more programs
    for few rows); for D <= 64, where each tile's dot is short, 32 x 32 tiles (the per-tile label loads
    and running-extreme updates spread over twice the columns); for D > 128, where the dot dominates,
    64 x 16 tiles with 8 warps; each with maxnreg=255 (under ptxas's own cap of 128 registers the 4-warp
    programs spilled: fp32 ieee on Triton 3.9, fp16 with unaligned rows on 3.6)."""
    if interpreting():
        return [dict(BM=32, BN=32, BK=block_d(d), SUBK=16, num_warps=4)]
    # only configs the sm_90 compile check finds spill-free on Triton 3.6 and the latest Triton in every kind
    # (bench/RESULTS.md lists the ones dropped for spilling)
    cands = [dict(BM=64, BN=32, BK=16, SUBK=1, num_warps=8)]
    cands.append(dict(BM=32, BN=16, BK=16, SUBK=1, num_warps=4, maxnreg=255))
    bucket = triton.next_power_of_2(d)
    if bucket <= 64:
        cands.append(dict(BM=32, BN=32, BK=16, SUBK=1, num_warps=4, maxnreg=255))
    elif bucket > 128:
        cands.append(dict(BM=64, BN=16, BK=16, SUBK=1, num_warps=8, maxnreg=255))
    return cands


def extreme_config(d: int) -> dict:
    """The default (first) candidate of :func:`extreme_configs`."""
    return dict(extreme_configs(d)[0])


# autotuning: the chosen candidate index per key; FORCE_CANDIDATE (tests, compile_check) pins an index
_TUNED: dict = {}
FORCE_CANDIDATE: list[int] = []


def _can_tune(device) -> bool:
    return device is not None and device.type == "cuda" and not interpreting()


def _time_candidate(run, device) -> float:
    """Median time in ms of three launches of ``run`` after one warm-up (CUDA events)."""
    run()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


def autotuned(key, candidates: list[dict], run, device) -> dict:
    """The candidate to launch for ``key``: ``FORCE_CANDIDATE`` if set; the first under the interpreter or
    off CUDA; on CUDA the fastest of ``candidates`` by :func:`_time_candidate` of ``run(candidate)`` (which
    must only write its own outputs), measured on the first call of the key and cached."""
    if FORCE_CANDIDATE:
        return dict(candidates[min(FORCE_CANDIDATE[-1], len(candidates) - 1)])
    if len(candidates) == 1 or not _can_tune(device):
        return dict(candidates[0])
    if key not in _TUNED:
        times = [_time_candidate(lambda c=c: run(dict(c)), device) for c in candidates]
        _TUNED[key] = min(range(len(candidates)), key=lambda i: (times[i], i))
    return dict(candidates[_TUNED[key]])


def tune_key(name: str, p, prec: str) -> tuple:
    """(kernel, D bucket, dtype, kind, precision): the key of :func:`autotuned`."""
    return (name, triton.next_power_of_2(p.d), str(p.x.dtype), p.kind, prec)


@triton.jit
def pair_coef(g, dp, KIND: tl.constexpr):
    """c = g * dd'/dq * 2 for l2 (g / d, 0 at d = 0) and sql2 (2 g); for dot the weight g itself."""
    if KIND == 0:
        c = tl.where(dp > 0, g / tl.where(dp > 0, dp, 1.0), 0.0)
    elif KIND == 1:
        c = 2.0 * g
    else:
        c = g
    return c


@triton.jit
def grad_tile(
    acc,
    rs,
    c,
    near,
    own_ptr,
    oth_ptr,
    near_ptr,
    rows,
    rmask,
    cols,
    cmask,
    g0,
    D,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BG: tl.constexpr,
    SUBK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Accumulate one tile's gradient contribution to the owned rows, D group [g0, g0 + BG).

    l2/sql2: out_i = sum_j c_ij (own_i - oth_j): the far entries go through ``rs += rowsum(c)`` and
    ``acc += c @ oth`` (finished by the caller as ``rs * own - acc``); the near entries (cancellation) are
    added by direct differences into the fp32 scratch ``near_ptr`` (zero-initialised, rows owned by this
    program; a barrier orders the read-modify-write). dot: out_i = -sum_j c_ij oth_j, ``acc += c @ oth``.
    """
    kk = g0 + tl.arange(0, BG)
    o = tl.load(oth_ptr + cols[:, None] * D + kk[None, :], mask=cmask[:, None] & (kk[None, :] < D), other=0.0)
    o = o.to(tl.float32)
    if KIND == 2:
        acc = tl.dot(c, o, acc, input_precision=PREC)
    else:
        cf = tl.where(near, 0.0, c)
        rs += tl.sum(cf, axis=1)
        acc = tl.dot(cf, o, acc, input_precision=PREC)
        cn = tl.where(near, c, 0.0)
        if tl.max((cn != 0).to(tl.int32)) > 0:
            for k0 in range(0, BG, SUBK):
                k2 = g0 + k0 + tl.arange(0, SUBK)
                km = k2 < D
                a = tl.load(own_ptr + rows[:, None] * D + k2[None, :], mask=rmask[:, None] & km[None, :], other=0.0).to(
                    tl.float32
                )
                b = tl.load(oth_ptr + cols[:, None] * D + k2[None, :], mask=cmask[:, None] & km[None, :], other=0.0).to(
                    tl.float32
                )
                part = tl.sum(cn[:, :, None] * (a[:, None, :] - b[None, :, :]), axis=1)
                nptr = near_ptr + rows[:, None] * D + k2[None, :]
                nm = rmask[:, None] & km[None, :]
                old = tl.load(nptr, mask=nm, other=0.0)
                tl.store(nptr, old + part, mask=nm)
                tl.debug_barrier()
    return acc, rs


@triton.jit
def grad_finish(
    acc,
    rs,
    own_ptr,
    near_ptr,
    out_ptr,
    rows,
    rmask,
    g0,
    D,
    scale,
    KIND: tl.constexpr,
    BG: tl.constexpr,
    HAS_NEAR: tl.constexpr,
    ACCUM: tl.constexpr = False,
):
    """out[rows, group] (+)= scale * (rs * own - acc + near) (l2/sql2) or scale * (-acc) (dot).

    With ``ACCUM`` the result is added to what ``out`` holds (an earlier launch wrote it: stream order).
    """
    kk = g0 + tl.arange(0, BG)
    m2 = rmask[:, None] & (kk[None, :] < D)
    offs = rows[:, None] * D + kk[None, :]
    if KIND == 2:
        res = -acc
    else:
        own = tl.load(own_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        res = rs[:, None] * own - acc
        if HAS_NEAR:
            tl.debug_barrier()
            res += tl.load(near_ptr + offs, mask=m2, other=0.0)
    res = res * scale
    if ACCUM:
        res += tl.load(out_ptr + offs, mask=m2, other=0.0)
    tl.store(out_ptr + offs, res, mask=m2)

"""The fused primitives as ``torch.library`` custom ops, behind autograd and ``torch.compile``.

Every loss and miner of fastdml reduces to a handful of primitives over the signed distance
``d'`` (see ``docs/ARCHITECTURE.md``)::

    contrastive_stats  -> [S+, C+, S-, C-]   sums and counts of the contrastive terms
    triplet_stats      -> [S, C]             all triplets in a band, hinge or softplus
    semihard_stats     -> [S, C]             FaceNet / TF-Addons semi-hard triplets
    row_extreme        -> (value, index, found) per anchor (batch-hard style mining)
    row_hardest        -> both of batch-hard's row_extremes (pos max, neg min) from one sweep
    pair_values        -> d' of listed pairs (exact, differentiable, O(T D))
    chosen_triplet_stats -> [S, C] of one given triplet per anchor (batch-hard picks), O(N D)
    triplet_list / pair_list                 listing miners (PML's index tuples)

This module is the glue between the public API and the backends. It asks :mod:`fastdml.dispatch` (the one
place that chooses) for the path, and

- ``"reference"``: calls :mod:`fastdml.reference` directly (plain autograd through a materialized matrix);
- ``"blocked"`` / ``"triton"``: calls the custom op ``torch.ops.fastdml.<name>``, whose implementation runs
  the backend's ``<name>_fwd`` (:mod:`fastdml.blocked` or :mod:`fastdml.kernels`). The stats ops compute their
  gradient during the forward sweep (the parts ``dS_k/dx``), so their backward is one weighted sum, no second
  sweep: ``dL/dx = sum_k dL/dS_k * dS_k/dx``.

Eagerly the implementation behind each custom op is called directly (differentiable ones through a plain
``autograd.Function`` with the op's own setup and backward, :func:`_call`): the dispatcher's path costs more
than some whole ops. Under ``torch.compile`` the custom ops are called and the Python dispatch is skipped
(Dynamo sees only the custom ops, whose fake implementations give every output's shape without
data-dependent branches), and the backend is chosen when the op runs.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import _context, _nanrule, dispatch
from .blocked.distance import acc_dtype, add_rows

__all__ = [
    "contrastive_stats",
    "triplet_stats",
    "semihard_stats",
    "row_extreme",
    "row_hardest",
    "pair_values",
    "chosen_triplet_stats",
    "triplet_list",
    "pair_list",
    "KINDS",
]

KINDS = ("l2", "sql2", "dot")
INF = math.inf


# ----------------------------------------------------------------------------------------------------------
# backend selection (runs eagerly, inside the custom ops)
# ----------------------------------------------------------------------------------------------------------
def _backend_module(x: Tensor):
    """The module implementing the contract for ``x``: ``fastdml.blocked`` or ``fastdml.kernels``."""
    name = dispatch.backend_for(x)
    if name == "triton":
        kernels = importlib.import_module("fastdml.kernels")
        # the kernels take fp16/bf16/fp32; float64 (tests, gradcheck) runs on the exact blocked path
        if x.dtype == torch.float64 and not getattr(kernels, "SUPPORTS_FLOAT64", False):
            return importlib.import_module("fastdml.blocked")
        return kernels
    # "reference" never reaches a custom op eagerly; under torch.compile it runs the blocked path
    return importlib.import_module("fastdml.blocked")


def _backend_fn(x: Tensor, name: str):
    module = _backend_module(x)
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"{module.__name__} does not implement {name}; use FASTDML_BACKEND=reference")
    return _without_autocast(fn, x.device.type)


def _without_autocast(fn, device_type: str):
    """[issue 7, mixed precision] Run ``fn`` with autocast off: the backends choose their own accumulation dtype
    (fp32 for fp16/bf16/fp32 inputs), and an enclosing ``torch.autocast`` region would otherwise turn their fp32
    GEMMs into bf16/fp16 ones (custom ops are not autocast-aware, the ops inside them are)."""

    def call(*args, **kwargs):
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return call


def _use_reference(x: Tensor, r: Optional[Tensor] = None) -> bool:
    if torch.compiler.is_compiling():
        return False
    return dispatch.backend_for(x) == "reference" or _nanrule.needs_reference(x, r)


def _reference():
    return _FP32_REFERENCE


class _Fp32Reference:
    """[issue 7, mixed precision] :mod:`fastdml.reference` with fp16/bf16 tensor arguments upcast to float32 (the
    accumulation dtype of the contract: no overflow of squared distances, fp32-accurate sums) and autocast off;
    the upcast is differentiable, so gradients reach the half-precision inputs in their dtype."""

    def __getattr__(self, name):
        fn = getattr(importlib.import_module("fastdml.reference"), name)

        def call(*args):
            up = tuple(
                a.float() if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a for a in args
            )
            device = next((a.device.type for a in up if isinstance(a, Tensor)), "cpu")
            with torch.autocast(device_type=device, enabled=False):
                return fn(*up)

        return call


_FP32_REFERENCE = _Fp32Reference()


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# the stats ops: one custom op each, outputs (stats, gx_parts, gr_parts)
# ----------------------------------------------------------------------------------------------------------
def _fake_stats(x: Tensor, r: Optional[Tensor], n_stats: int, n_parts: int, need_grad: bool, need_grad_r: bool):
    n, d = x.shape
    k = n_parts if need_grad else 0
    gx = x.new_empty((k, n, d), dtype=acc_dtype(x.dtype))
    if r is None:
        gr = x.new_empty((0, 0, d), dtype=acc_dtype(x.dtype))
    else:
        gr = x.new_empty((k if need_grad_r else 0, r.shape[0], d), dtype=acc_dtype(x.dtype))
    return x.new_empty((n_stats,), dtype=torch.float64), gx, gr


def _run_stats(x: Tensor, name: str, args: tuple, need_grad_r: bool):
    """Run the backend's ``<name>`` on ``args`` (ending with ``need_grad``); ``need_grad_r`` goes by keyword.

    [issue 7] ``need_grad_r=False`` (references that need no gradient: a detached memory queue, a detached
    pool): the backend skips every column-side computation and returns ``gr_parts`` of shape (0, M, D).
    """
    stats, gx, gr = _backend_fn(x, name)(*args, need_grad_r=need_grad_r)
    return stats, gx, gr


def _stats_setup_context(ctx, inputs, output):
    _, gx_parts, gr_parts = output
    x, r = inputs[0], inputs[2]
    ctx.save_for_backward(gx_parts, gr_parts)
    ctx.x_dtype = x.dtype
    # the last input is need_grad_r: without it r gets no gradient (None), its parts were never computed
    ctx.r_dtype = None if (r is None or not inputs[-1]) else r.dtype
    # (parts carry no gradient: the backward ignores what flows into them)


def _make_stats_backward(sum_slots: tuple[int, ...], n_inputs: int):
    """Backward of a stats op: ``dL/dx = sum_k dL/dS_k * dS_k/dx`` with the parts saved by the forward."""

    def backward(ctx, grad_stats, _grad_gx, _grad_gr):
        gx_parts, gr_parts = ctx.saved_tensors
        grads: list[Optional[Tensor]] = [None] * n_inputs
        if grad_stats is None:
            return tuple(grads)
        if gx_parts.shape[0] != len(sum_slots):
            raise RuntimeError(
                "fastdml: backward through a stats op whose forward ran without gradient parts "
                "(was the forward run under torch.no_grad() or on inputs that did not require grad?)"
            )
        if len(sum_slots) == 1:
            # one part: a scaling (no einsum, which autocast would also touch)
            k = sum_slots[0]
            weight = grad_stats[k : k + 1].to(gx_parts.dtype)
            grads[0] = (gx_parts[0] * weight).to(ctx.x_dtype)
            if ctx.r_dtype is not None:
                grads[2] = (gr_parts[0] * weight).to(ctx.r_dtype)
            return tuple(grads)
        weights = grad_stats[list(sum_slots)].to(gx_parts.dtype)
        # [issue 7, mixed precision] a backward run inside torch.autocast must not turn this sum into a bf16 GEMM
        with torch.autocast(device_type=gx_parts.device.type, enabled=False):
            grads[0] = torch.einsum("k,knd->nd", weights, gx_parts).to(ctx.x_dtype)
            if ctx.r_dtype is not None:
                grads[2] = torch.einsum("k,knd->nd", weights, gr_parts).to(ctx.r_dtype)
        return tuple(grads)

    return backward


# ----------------------------------------------------------------------------------------------------------
# eager calls: the same implementation, setup and backward as the custom op, without the dispatcher
# ----------------------------------------------------------------------------------------------------------
class _OpSpec:
    """What an eager call of custom op ``name`` runs: its implementation and, if differentiable, the same
    ``setup_context`` and ``backward`` that are registered with the custom op."""

    def __init__(self, name, impl, setup_context=None, backward=None):
        self.name, self.impl, self.setup_context, self.backward = name, impl, setup_context, backward


class _EagerOp(torch.autograd.Function):
    """A custom op's autograd in eager mode. The dispatcher path of a ``torch.library`` custom op with autograd
    costs about 170 us per forward+backward on this project's CPU (schema checks, redispatch, the Dynamo guard
    around the implementation): 4% of a batch-hard step. Eagerly the same functions run through this plain
    ``autograd.Function``; under ``torch.compile`` the custom op is called (see :func:`_call`)."""

    @staticmethod
    def forward(ctx, spec, *args):
        out = spec.impl(*args)
        spec.setup_context(ctx, args, out)
        ctx.spec = spec
        if isinstance(out, tuple):
            # a stats op's gradient parts carry no gradient (their backward ignores what flows into them)
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.spec.backward(ctx, *grads))


def _call(spec: _OpSpec, *args):
    """Run custom op ``spec.name`` on ``args``: the op itself while ``torch.compile`` traces, else its
    implementation directly (through :class:`_EagerOp` when it is differentiable; results are the same)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fastdml, spec.name)(*args)
    if spec.backward is None:
        with torch.no_grad():
            return spec.impl(*args)
    return _EagerOp.apply(spec, *args)


def _contrastive_stats_impl(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    pos_margin: float,
    neg_margin: float,
    pos_lo: float,
    neg_hi: float,
    low: float,
    high: float,
    need_grad: bool,
    need_grad_r: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high, need_grad)
    return _run_stats(x, "contrastive_stats_fwd", args, need_grad_r)


_contrastive_stats_op = torch.library.custom_op("fastdml::contrastive_stats", _contrastive_stats_impl, mutates_args=())


@_contrastive_stats_op.register_fake
def _(x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high, need_grad, need_grad_r):
    return _fake_stats(x, r, 4, 2, need_grad, need_grad_r)


_CONTRASTIVE_STATS = _OpSpec(
    "contrastive_stats", _contrastive_stats_impl, _stats_setup_context, _make_stats_backward((0, 2), 14)
)
_contrastive_stats_op.register_autograd(_CONTRASTIVE_STATS.backward, setup_context=_stats_setup_context)


def _triplet_stats_impl(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    margin: float,
    smooth: bool,
    band_lo: float,
    band_hi: float,
    low: float,
    high: float,
    need_grad: bool,
    need_grad_r: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high, need_grad)
    return _run_stats(x, "triplet_stats_fwd", args, need_grad_r)


_triplet_stats_op = torch.library.custom_op("fastdml::triplet_stats", _triplet_stats_impl, mutates_args=())


@_triplet_stats_op.register_fake
def _(x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high, need_grad, need_grad_r):
    return _fake_stats(x, r, 2, 1, need_grad, need_grad_r)


_TRIPLET_STATS = _OpSpec("triplet_stats", _triplet_stats_impl, _stats_setup_context, _make_stats_backward((0,), 14))
_triplet_stats_op.register_autograd(_TRIPLET_STATS.backward, setup_context=_stats_setup_context)


def _semihard_stats_impl(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    margin: float,
    need_grad: bool,
    need_grad_r: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_stats(x, "semihard_stats_fwd", (x, y, r, z, excl, kind, margin, need_grad), need_grad_r)


_semihard_stats_op = torch.library.custom_op("fastdml::semihard_stats", _semihard_stats_impl, mutates_args=())


@_semihard_stats_op.register_fake
def _(x, y, r, z, excl, kind, margin, need_grad, need_grad_r):
    return _fake_stats(x, r, 2, 1, need_grad, need_grad_r)


_SEMIHARD_STATS = _OpSpec("semihard_stats", _semihard_stats_impl, _stats_setup_context, _make_stats_backward((0,), 9))
_semihard_stats_op.register_autograd(_SEMIHARD_STATS.backward, setup_context=_stats_setup_context)
_STATS_SPECS = {spec.name: spec for spec in (_CONTRASTIVE_STATS, _TRIPLET_STATS, _SEMIHARD_STATS)}


def _stats(name: str, x, y, r, z, excl, kind: str, params: tuple) -> Tensor:
    """The shared path of the stats ops: the reference (plain autograd) or the custom op ``fastdml::<name>``.

    [issue 7 hook] Inside a pool context (distributed wrapper, cross-batch memory) a rectangular op skips each
    query's own reference row and the stats are added over the ranks: see :mod:`fastdml._context`.
    """
    _check_kind(kind)
    excl = _context.resolve_excl(x, r, excl)
    if _use_reference(x, r):
        stats = getattr(_reference(), name)(x, y, r, z, excl, kind, *params)
    else:
        # [issue 7] gradient parts only for what needs them: r (a detached memory queue or pool) often does not
        need_grad = _needs_grad(x, r)
        need_grad_r = need_grad and _needs_grad(r)
        stats, _, _ = _call(_STATS_SPECS[name], x, y, r, z, excl, kind, *params, need_grad, need_grad_r)
    return _context.reduce_stats(stats)


def contrastive_stats(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    pos_margin: float,
    neg_margin: float,
    pos_lo: float = -INF,
    neg_hi: float = INF,
    low: float = -INF,
    high: float = INF,
) -> Tensor:
    """Sums and counts of the contrastive terms over all pairs: float64 ``[S+, C+, S-, C-]``.

    Positive pair (i, j), ``z_j == y_i`` (j not excluded), selected iff ``d'_ij > pos_lo``, term
    ``relu(d'_ij - pos_margin)``; negative pair selected iff ``d'_ij < neg_hi``, term ``relu(neg_margin - d'_ij)``.
    A term is counted iff ``low < term < high`` (the reducer's window). ``S`` sums the counted terms, ``C``
    counts them. Differentiable in ``x`` and ``r`` through ``S+`` and ``S-``.
    """
    params = (float(pos_margin), float(neg_margin), float(pos_lo), float(neg_hi), float(low), float(high))
    return _stats("contrastive_stats", x, y, r, z, excl, kind, params)


def triplet_stats(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    margin: float,
    smooth: bool = False,
    band_lo: float = -INF,
    band_hi: float = INF,
    low: float = -INF,
    high: float = INF,
) -> Tensor:
    """Sum and count of the triplet terms over all triplets in a band: float64 ``[S, C]``.

    Triplets (i, p, n) with ``p in P(i)``, ``n in Q(i)``; with ``t = d'_in - d'_ip`` the triplet is selected
    iff ``band_lo < t <= band_hi``; ``v = d'_ip - d'_in + margin``; term ``relu(v)`` (``softplus(v)`` if
    ``smooth``), counted iff ``low < term < high``. Differentiable through ``S``.
    """
    params = (float(margin), bool(smooth), float(band_lo), float(band_hi), float(low), float(high))
    return _stats("triplet_stats", x, y, r, z, excl, kind, params)


def semihard_stats(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    margin: float,
) -> Tensor:
    """FaceNet semi-hard triplets (TF-Addons semantics): float64 ``[S, C]``.

    For each positive pair (i, p) of an anchor with a negative, ``n*`` is the negative with the smallest
    ``d'_in > d'_ip``, else the farthest negative; ``S = sum relu(d'_ip - d'_in* + margin)``, ``C`` the number
    of such pairs. Differentiable through ``S``.
    """
    return _stats("semihard_stats", x, y, r, z, excl, kind, (float(margin),))


# ----------------------------------------------------------------------------------------------------------
# chosen_triplet_stats: one given triplet per anchor (batch-hard picks), gradient in the forward
# ----------------------------------------------------------------------------------------------------------
def _chosen_triplet_stats_impl(
    x: Tensor,
    valid: Tensor,
    r: Optional[Tensor],
    p: Tensor,
    n: Tensor,
    kind: str,
    margin: float,
    smooth: bool,
    low: float,
    high: float,
    need_grad: bool,
    need_grad_r: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # O(N D) in a few tensor ops: one implementation serves every device (no sweep to fuse)
    from .blocked import chosen_triplet_stats_fwd

    fwd = _without_autocast(chosen_triplet_stats_fwd, x.device.type)
    return fwd(x, valid, r, p, n, kind, margin, smooth, low, high, need_grad, need_grad_r=need_grad_r)


_chosen_triplet_stats_op = torch.library.custom_op(
    "fastdml::chosen_triplet_stats", _chosen_triplet_stats_impl, mutates_args=()
)


@_chosen_triplet_stats_op.register_fake
def _(x, valid, r, p, n, kind, margin, smooth, low, high, need_grad, need_grad_r):
    return _fake_stats(x, r, 2, 1, need_grad, need_grad_r)


_CHOSEN_TRIPLET_STATS = _OpSpec(
    "chosen_triplet_stats", _chosen_triplet_stats_impl, _stats_setup_context, _make_stats_backward((0,), 12)
)
_chosen_triplet_stats_op.register_autograd(_CHOSEN_TRIPLET_STATS.backward, setup_context=_stats_setup_context)


def chosen_triplet_stats(
    x: Tensor,
    valid: Tensor,
    r: Optional[Tensor],
    p: Tensor,
    n: Tensor,
    kind: str,
    margin: float,
    smooth: bool = False,
    low: float = -INF,
    high: float = INF,
) -> Tensor:
    """Sum and count of the terms of one chosen triplet per anchor: float64 ``[S, C]``.

    Anchor i is row i of ``x``; its positive is ``r[p_i]`` and its negative ``r[n_i]`` (``r=None``: rows of x);
    ``v_i = d'_{i p_i} - d'_{i n_i} + margin``, term ``relu(v_i)`` (``softplus(v_i)`` if ``smooth``), counted
    iff ``valid_i`` and ``low < term_i < high``. Distances by direct differences (exact near 0; the L2
    gradient is 0 at d = 0). O(N D); the gradient is computed in the forward, so the backward is one scaling.
    Differentiable in ``x`` and ``r`` through ``S``; the stats are added over the ranks inside a distributed
    wrapper (see :mod:`fastdml._context`).
    """
    _check_kind(kind)
    p, n = p.to(torch.int64), n.to(torch.int64)
    valid = valid.to(torch.bool)
    params = (float(margin), bool(smooth), float(low), float(high))
    if _use_reference(x, r):
        stats = _reference().chosen_triplet_stats(x, valid, r, p, n, kind, *params)
    else:
        need_grad = _needs_grad(x, r)
        need_grad_r = need_grad and _needs_grad(r)
        stats, _, _ = _call(_CHOSEN_TRIPLET_STATS, x, valid, r, p, n, kind, *params, need_grad, need_grad_r)
    return _context.reduce_stats(stats)


# ----------------------------------------------------------------------------------------------------------
# row_extreme: mining, no gradient
# ----------------------------------------------------------------------------------------------------------
def _row_extreme_impl(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    side: str,
    mode: str,
    lo: float,
    hi: float,
    thr: Optional[Tensor],
    thr_op: str,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _backend_fn(x, "row_extreme")
    value, index, found = fn(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op)
    return value, index, found


_row_extreme_op = torch.library.custom_op("fastdml::row_extreme", _row_extreme_impl, mutates_args=())
_ROW_EXTREME = _OpSpec("row_extreme", _row_extreme_impl)


@_row_extreme_op.register_fake
def _(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op):
    n = x.shape[0]
    return (
        x.new_empty((n,), dtype=acc_dtype(x.dtype)),
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.bool),
    )


def row_extreme(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    side: str,
    mode: str,
    lo: float = -INF,
    hi: float = INF,
    thr: Optional[Tensor] = None,
    thr_op: str = "",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor, the max or min ``d'`` over its positives (``side="pos"``) or negatives (``"neg"``).

    Candidates satisfy ``lo <= d' <= hi`` and, when ``thr`` is given, ``d' > thr_i`` (``thr_op="gt"``) or
    ``d' < thr_i`` (``"lt"``). Returns ``(value, index, found)``; ties go to the lowest index; where nothing
    qualifies ``found`` is False. Not differentiable: re-evaluate the chosen pairs with :func:`pair_values`.
    """
    _check_kind(kind)
    if side not in ("pos", "neg"):
        raise ValueError(f"side must be 'pos' or 'neg', got {side!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if thr_op not in ("", "gt", "lt") or (thr is None) != (thr_op == ""):
        raise ValueError(f"thr_op must be 'gt' or 'lt' together with thr, or '' without; got {thr_op!r}")
    excl = _context.resolve_excl(x, r, excl)  # [issue 7 hook] see fastdml/_context.py
    x = x.detach()
    r = None if r is None else r.detach()
    if _use_reference(x, r):
        return _reference().row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op)
    thr = None if thr is None else thr.detach()
    return _call(_ROW_EXTREME, x, y, r, z, excl, kind, side, mode, float(lo), float(hi), thr, thr_op)


# ----------------------------------------------------------------------------------------------------------
# row_hardest: batch-hard mining in one sweep, no gradient
# ----------------------------------------------------------------------------------------------------------
def _row_hardest_impl(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _backend_fn(x, "row_hardest")
    return tuple(fn(x, y, r, z, excl, kind))


_row_hardest_op = torch.library.custom_op("fastdml::row_hardest", _row_hardest_impl, mutates_args=())
_ROW_HARDEST = _OpSpec("row_hardest", _row_hardest_impl)


@_row_hardest_op.register_fake
def _(x, y, r, z, excl, kind):
    n = x.shape[0]
    value = lambda: x.new_empty((n,), dtype=acc_dtype(x.dtype))  # noqa: E731
    index = lambda: x.new_empty((n,), dtype=torch.int64)  # noqa: E731
    found = lambda: x.new_empty((n,), dtype=torch.bool)  # noqa: E731
    return value(), index(), found(), value(), index(), found()


def row_hardest(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch-hard mining in one sweep: per anchor i, ``max_{j in P(i)} d'_ij`` (farthest positive) and
    ``min_{j in Q(i)} d'_ij`` (nearest negative).

    The same as ``row_extreme(..., "pos", "max")`` and ``row_extreme(..., "neg", "min")`` (no band, no
    thresholds; ties to the lowest index) from one distance sweep. Returns
    ``(pos_value, pos_index, pos_found, neg_value, neg_index, neg_found)``. Not differentiable: re-evaluate
    the chosen pairs with :func:`pair_values`.
    """
    _check_kind(kind)
    excl = _context.resolve_excl(x, r, excl)  # [issue 7 hook] see fastdml/_context.py
    x = x.detach()
    r = None if r is None else r.detach()
    if _use_reference(x, r):
        return _reference().row_hardest(x, y, r, z, excl, kind)
    return _call(_ROW_HARDEST, x, y, r, z, excl, kind)


# ----------------------------------------------------------------------------------------------------------
# pair_values: exact d' of listed pairs, one implementation for every backend
# ----------------------------------------------------------------------------------------------------------
def _pair_chunk(n_pairs: int, dim: int) -> int:
    from .config import memory_budget_bytes

    # a chunk holds a (chunk, D) difference in the accumulation dtype, plus indices: stay within the budget
    per_pair = max(1, dim) * 8 + 32
    return max(1, min(n_pairs, memory_budget_bytes() // (4 * per_pair)))


def _pair_values_impl(x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str) -> Tensor:
    ref = x if r is None else r
    acc = acc_dtype(x.dtype)
    out = torch.empty(i.shape[0], dtype=acc, device=x.device)
    chunk = _pair_chunk(i.shape[0], x.shape[1])
    for s in range(0, i.shape[0], chunk):
        # index_select: a row gather (memcpy per row), ~6x faster on the CPU than advanced indexing x[i]
        xi = x.index_select(0, i[s : s + chunk]).to(acc)
        rj = ref.index_select(0, j[s : s + chunk]).to(acc)
        if kind == "dot":
            out[s : s + chunk] = -(xi * rj).sum(1)
        else:
            q = (xi - rj).square().sum(1)
            out[s : s + chunk] = q.sqrt() if kind == "l2" else q
    return out


_pair_values_op = torch.library.custom_op("fastdml::pair_values", _pair_values_impl, mutates_args=())


@_pair_values_op.register_fake
def _(x, r, i, j, kind):
    return x.new_empty(i.shape, dtype=acc_dtype(x.dtype))


def _pair_values_backward_impl(
    grad: Tensor, values: Tensor, x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    ref = x if r is None else r
    gr = gx if r is None else torch.zeros(r.shape, dtype=acc, device=r.device)
    chunk = _pair_chunk(i.shape[0], x.shape[1])
    for s in range(0, i.shape[0], chunk):
        ii, jj = i[s : s + chunk], j[s : s + chunk]
        g = grad[s : s + chunk].to(acc).unsqueeze(1)
        xi, rj = x.index_select(0, ii).to(acc), ref.index_select(0, jj).to(acc)
        if kind == "dot":
            # d' = -x.r : dd'/dx = -r, dd'/dr = -x
            gxi, grj = -g * rj, -g * xi
        else:
            diff = xi - rj
            if kind == "l2":
                d = values[s : s + chunk].to(acc).unsqueeze(1)
                # the subgradient 0 at d = 0 (PML's cdist convention), never a division by zero
                coef = torch.where(d > 0, g / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
            else:
                coef = 2.0 * g
            gxi, grj = coef * diff, -coef * diff
        add_rows(gx, ii, gxi)
        add_rows(gr, jj, grj)
    if r is None:
        return gx.to(x.dtype), x.new_empty((0, x.shape[1]))
    return gx.to(x.dtype), gr.to(r.dtype)


_pair_values_backward_op = torch.library.custom_op(
    "fastdml::pair_values_backward", _pair_values_backward_impl, mutates_args=()
)


@_pair_values_backward_op.register_fake
def _(grad, values, x, r, i, j, kind):
    return torch.empty_like(x), (x.new_empty((0, x.shape[1])) if r is None else torch.empty_like(r))


def _pair_values_setup(ctx, inputs, output):
    x, r, i, j, kind = inputs
    ctx.save_for_backward(output, x, r, i, j)
    ctx.kind = kind
    ctx.has_r = r is not None


def _pair_values_backward(ctx, grad):
    values, x, r, i, j = ctx.saved_tensors
    gx, gr = _call(_PAIR_VALUES_BACKWARD, grad, values, x, r if ctx.has_r else None, i, j, ctx.kind)
    return gx, (gr if ctx.has_r else None), None, None, None


_pair_values_op.register_autograd(_pair_values_backward, setup_context=_pair_values_setup)
_PAIR_VALUES = _OpSpec("pair_values", _pair_values_impl, _pair_values_setup, _pair_values_backward)
_PAIR_VALUES_BACKWARD = _OpSpec("pair_values_backward", _pair_values_backward_impl)


def pair_values(x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str) -> Tensor:
    """``d'`` of the listed pairs ``(x[i_t], r[j_t])``, computed by direct differences (exact near 0).

    ``r=None`` indexes both sides into ``x``. Returns float32 for fp16/bf16/fp32 inputs (float64 for float64).
    The L2 gradient is ``g (x_i - r_j) / d`` and 0 where ``d = 0``. Memory is O(T) plus a chunk of
    ``(chunk, D)`` within the memory budget; the backward accumulates deterministically.
    """
    _check_kind(kind)
    if _use_reference(x, r):
        return _reference().pair_values(x, r, i, j, kind)
    return _call(_PAIR_VALUES, x, r, i.to(torch.int64), j.to(torch.int64), kind)


# ----------------------------------------------------------------------------------------------------------
# listing miners: data-dependent output sizes. Eagerly a direct call (:func:`_call`); while torch.compile
# traces, custom ops whose fake implementations give the lists a size known only when the graph runs (an
# unbacked size: the caller enables torch._dynamo.config.capture_dynamic_output_shape_ops, as for
# torch.nonzero), copying the lists (a custom op's outputs may not alias)
# ----------------------------------------------------------------------------------------------------------
def _backend_call(name: str):
    """The backend's ``name`` called on ``(x, *args)``: a listing op's eager implementation (no copies)."""
    return lambda x, *args: _backend_fn(x, name)(x, *args)


_TRIPLET_LIST = _OpSpec("triplet_list", _backend_call("triplet_list"))
_PAIR_LIST = _OpSpec("pair_list", _backend_call("pair_list"))


@torch.library.custom_op("fastdml::triplet_list", mutates_args=())
def _triplet_list_op(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    band_lo: float,
    band_hi: float,
) -> tuple[Tensor, Tensor, Tensor]:
    a, p, n = _TRIPLET_LIST.impl(x, y, r, z, excl, kind, band_lo, band_hi)
    return a.clone(), p.clone(), n.clone()  # (a custom op's outputs may not alias each other or its inputs)


@_triplet_list_op.register_fake
def _(x, y, r, z, excl, kind, band_lo, band_hi):
    t = torch.library.get_ctx().new_dynamic_size()
    return tuple(x.new_empty((t,), dtype=torch.int64) for _ in range(3))


@torch.library.custom_op("fastdml::pair_list", mutates_args=())
def _pair_list_op(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    pos_lo: float,
    neg_hi: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a1, p, a2, n = _PAIR_LIST.impl(x, y, r, z, excl, kind, pos_lo, neg_hi)
    return a1.clone(), p.clone(), a2.clone(), n.clone()


@_pair_list_op.register_fake
def _(x, y, r, z, excl, kind, pos_lo, neg_hi):
    ctx = torch.library.get_ctx()
    n_pos, n_neg = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return tuple(x.new_empty((k,), dtype=torch.int64) for k in (n_pos, n_pos, n_neg, n_neg))


def triplet_list(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    band_lo: float = -INF,
    band_hi: float = INF,
) -> tuple[Tensor, Tensor, Tensor]:
    """All triplets (a, p, n) with ``band_lo < d'_an - d'_ap <= band_hi``, int64, in PML's lexicographic order."""
    _check_kind(kind)
    excl = _context.resolve_excl(x, r, excl)  # [issue 7 hook] see fastdml/_context.py
    x = x.detach()
    r = None if r is None else r.detach()
    if _use_reference(x, r):
        return _reference().triplet_list(x, y, r, z, excl, kind, band_lo, band_hi)
    return _call(_TRIPLET_LIST, x, y, r, z, excl, kind, float(band_lo), float(band_hi))


def pair_list(
    x: Tensor,
    y: Tensor,
    r: Optional[Tensor],
    z: Optional[Tensor],
    excl: Optional[Tensor],
    kind: str,
    pos_lo: float = -INF,
    neg_hi: float = INF,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Positive pairs with ``d' > pos_lo`` and negative pairs with ``d' < neg_hi``: ``(a1, p, a2, n)`` int64,
    in PML's row-major order."""
    _check_kind(kind)
    excl = _context.resolve_excl(x, r, excl)  # [issue 7 hook] see fastdml/_context.py
    x = x.detach()
    r = None if r is None else r.detach()
    if _use_reference(x, r):
        return _reference().pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi)
    return _call(_PAIR_LIST, x, y, r, z, excl, kind, float(pos_lo), float(neg_hi))

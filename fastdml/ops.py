"""The fused primitives as ``torch.library`` custom ops, behind autograd and ``torch.compile``.

Every loss and miner of fastdml reduces to a handful of primitives over the signed distance
``d'`` (see ``docs/ARCHITECTURE.md``)::

    contrastive_stats    -> [S+, C+, S-, C-]  sums and counts of the contrastive terms
    triplet_stats        -> [S, C]            all triplets in a band, hinge or softplus
    semihard_stats       -> [S, C]            FaceNet / TF-Addons semi-hard triplets
    chosen_triplet_stats -> [S, C]            one given triplet per anchor (batch-hard picks), O(N D)
    row_extreme          -> (value, index, found) per anchor (batch-hard style mining)
    row_hardest          -> both of batch-hard's row_extremes (pos max, neg min) from one sweep
    triplet_list / pair_list                  listing miners (PML's index tuples)
    pair_values          -> d' of listed pairs (exact, differentiable, O(T D))

Each primitive is written once, as its public function below (signature, defaults, docstring, and a body
that checks the op's own arguments); :func:`_stats_op` and :func:`_mining_op` derive from it the custom op
``torch.ops.fastdml.<name>`` (schema inferred from the annotations, without defaults), its fake, its autograd
and the eager call. :mod:`fastdml.dispatch` chooses the implementation inside the op.

The stats ops compute their gradient during the forward sweep (the parts ``dS_k/dx``), so their backward is
one weighted sum: ``dL/dx = sum_k dL/dS_k * dS_k/dx``. Eagerly the implementation runs through a plain
``autograd.Function`` with the op's own setup and backward (the dispatcher's path costs more than some whole
ops); while ``torch.compile`` traces, the custom op itself is called, so Dynamo sees only the custom ops.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from . import _context, dispatch, portable
from .portable.rows import acc_dtype

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
_EMPTY = inspect.Parameter.empty
_OPS: dict = {}  # name -> _Op, every custom op of this module


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _without_autocast(fn, device_type: str):
    """``fn`` with autocast off: the backends choose their own accumulation dtype, and custom ops are not
    autocast-aware (an enclosing ``torch.autocast`` would turn their fp32 GEMMs into fp16/bf16 ones)."""

    def call(*args, **kwargs):
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return call


def _reference(name: str):
    """:mod:`fastdml.reference`'s ``name`` with fp16/bf16 tensors upcast to float32 (the contract's
    accumulation dtype; the upcast is differentiable) and autocast off."""
    fn = getattr(importlib.import_module("fastdml.reference"), name)

    def call(*args):
        half = (torch.float16, torch.bfloat16)
        up = tuple(a.float() if isinstance(a, Tensor) and a.dtype in half else a for a in args)
        device = next((a.device.type for a in up if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*up)

    return call


def _backend(name: str):
    """The implementation of backend entry point ``name`` for ``(x, *args)``, chosen by dispatch."""

    def run(x, *args, **kwargs):
        return _without_autocast(dispatch.implementation(x, name), x.device.type)(x, *args, **kwargs)

    return run


# one op: the custom op and the same implementation called eagerly
class _Op:
    """Custom op ``fastdml::<name>`` from ``impl`` (whose ``__signature__`` gives the schema) and ``fake``; the
    eager call runs ``eager`` (default ``impl``) with the same ``setup_context`` and ``backward``."""

    def __init__(self, name, impl, fake, setup_context=None, backward=None, eager=None):
        self.name, self.impl, self.setup_context, self.backward = name, eager or impl, setup_context, backward
        self.op = torch.library.custom_op(f"fastdml::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)
        _OPS[name] = self

    def __call__(self, *args):
        """The op itself while ``torch.compile`` traces, else its implementation (same results)."""
        if torch.compiler.is_compiling():
            return getattr(torch.ops.fastdml, self.name)(*args)
        if self.backward is None:
            with torch.no_grad():
                return self.impl(*args)
        return _EagerOp.apply(self, *args)


class _EagerOp(torch.autograd.Function):
    """A custom op's autograd without the dispatcher (schema checks and redispatch cost more than small ops)."""

    @staticmethod
    def forward(ctx, op, *args):
        out = op.impl(*args)
        op.setup_context(ctx, args, out)
        ctx.op = op
        if isinstance(out, tuple):
            # a stats op's gradient parts carry no gradient (their backward ignores what flows into them)
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.op.backward(ctx, *grads))


def _parameter(name: str, annotation: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)


def _op_function(name: str, run, sig: inspect.Signature, extra=(), returns=None):
    """``run`` under the schema of ``sig`` without defaults (plus ``extra`` parameters, and ``returns``)."""
    params = [p.replace(default=_EMPTY) for p in sig.parameters.values()]
    params += [_parameter(n, a) for n, a in extra]
    run.__signature__ = sig.replace(parameters=params, return_annotation=returns or sig.return_annotation)
    run.__name__ = run.__qualname__ = f"_{name}_impl"
    return run


class _Arguments:
    """Binds a public function's arguments: positional fast path, casts by annotation (float, bool)."""

    _CASTS = {"float": float, "bool": bool}

    def __init__(self, spec):
        self.spec, self.sig = spec, inspect.signature(spec)
        self.names = list(self.sig.parameters)
        self.defaults = [p.default for p in self.sig.parameters.values()]
        self.casts = [self._CASTS.get(p.annotation) for p in self.sig.parameters.values()]

    def __call__(self, args, kwargs) -> dict:
        n = len(args)
        args = (*args, *(kwargs.get(k, d) for k, d in zip(self.names[n:], self.defaults[n:])))
        if n > len(self.names) or any(k not in self.names[n:] for k in kwargs) or any(a is _EMPTY for a in args):
            self.sig.bind(*args[:n], **kwargs)  # raises the usual TypeError naming the argument
        _check_kind(args[self.names.index("kind")])
        a = dict(zip(self.names, args))
        a.update(self.spec(*args) or {})  # the op's own argument checks and conversions
        if "excl" in a:
            # inside a pool context (distributed, cross-batch memory) each query skips its own reference row
            a["excl"] = _context.resolve_excl(a["x"], a["r"], a["excl"])
        for name, cast in zip(self.names, self.casts):
            if cast is not None:
                a[name] = cast(a[name])
        return a


# the stats ops: outputs (stats, gx_parts, gr_parts), the gradient computed in the forward
def _stats_op(n_stats: int):
    """Define a stats op from its public function: ``n_stats`` stats ``[S_1, C_1, S_2, C_2, ...]``, each sum
    ``S_k`` with one gradient part. The op takes two more arguments, ``need_grad`` and ``need_grad_r``."""
    n_parts = n_stats // 2

    def define(spec):
        name, args_of = spec.__name__, _Arguments(spec)
        r_at, n_inputs = args_of.names.index("r"), len(args_of.names) + 2
        fwd = _backend(f"{name}_fwd")

        def impl(*args):
            return fwd(*args[:-1], need_grad_r=args[-1])

        def fake(*args):
            x, r, need_grad, need_grad_r = args[0], args[r_at], args[-2], args[-1]
            k = n_parts if need_grad else 0
            gr = (0, 0) if r is None else (k if need_grad_r else 0, r.shape[0])
            parts = [x.new_empty(shape + x.shape[1:], dtype=acc_dtype(x.dtype)) for shape in ((k, x.shape[0]), gr)]
            return (x.new_empty((n_stats,), dtype=torch.float64), *parts)

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output[1], output[2])
            r, ctx.x_dtype = inputs[r_at], inputs[0].dtype
            # without need_grad_r (the last input) r gets no gradient: its parts were never computed
            ctx.r_dtype = None if (r is None or not inputs[-1]) else r.dtype

        def backward(ctx, grad_stats, _grad_gx, _grad_gr):
            gx_parts, gr_parts = ctx.saved_tensors
            grads: list[Optional[Tensor]] = [None] * n_inputs
            if grad_stats is None:
                return tuple(grads)
            if gx_parts.shape[0] != n_parts:
                raise RuntimeError(
                    "fastdml: backward through a stats op whose forward ran without gradient parts "
                    "(was the forward run under torch.no_grad() or on inputs that did not require grad?)"
                )
            weights = grad_stats[0::2].to(gx_parts.dtype)
            # einsum with autocast off: a backward inside torch.autocast must not become a bf16 GEMM
            with torch.autocast(device_type=gx_parts.device.type, enabled=False):
                grads[0] = _weighted(weights, gx_parts).to(ctx.x_dtype)
                if ctx.r_dtype is not None:
                    grads[r_at] = _weighted(weights, gr_parts).to(ctx.r_dtype)
            return tuple(grads)

        extra = [("need_grad", "bool"), ("need_grad_r", "bool")]
        impl = _op_function(name, impl, args_of.sig, extra, "tuple[Tensor, Tensor, Tensor]")
        op = _Op(name, impl, fake, setup_context, backward)

        @functools.wraps(spec)
        def public(*args, **kwargs):
            a = args_of(args, kwargs)
            x, r = a["x"], a["r"]
            if dispatch.use_reference(x, r):
                stats = _reference(name)(*a.values())
            else:
                # gradient parts only for what needs them: r (a detached memory queue or pool) often does not
                need_grad = _needs_grad(x, r)
                stats = op(*a.values(), need_grad, need_grad and _needs_grad(r))[0]
            return _context.reduce_stats(stats)

        return public

    return define


def _weighted(weights: Tensor, parts: Tensor) -> Tensor:
    """``sum_k weights_k parts_k``: one part is a scaling (no einsum)."""
    if parts.shape[0] == 1:
        return parts[0] * weights[:1]
    return torch.einsum("k,knd->nd", weights, parts)


@_stats_op(n_stats=4)
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


@_stats_op(n_stats=2)
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


@_stats_op(n_stats=2)
def semihard_stats(
    x: Tensor, y: Tensor, r: Optional[Tensor], z: Optional[Tensor], excl: Optional[Tensor], kind: str, margin: float
) -> Tensor:
    """FaceNet semi-hard triplets (TF-Addons semantics): float64 ``[S, C]``.

    For each positive pair (i, p) of an anchor with a negative, ``n*`` is the negative with the smallest
    ``d'_in > d'_ip``, else the farthest negative; ``S = sum relu(d'_ip - d'_in* + margin)``, ``C`` the number
    of such pairs. Differentiable through ``S``.
    """


@_stats_op(n_stats=2)
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
    return {"valid": valid.to(torch.bool), "p": p.to(torch.int64), "n": n.to(torch.int64)}


# the mining ops: no gradient; one shared preamble (checks, exclusions, detached inputs)
def _mining_op(fake):
    """Define a mining op from its public function and ``fake``. Listing ops have data-dependent sizes: their
    fakes ask for unbacked sizes (the caller enables ``capture_dynamic_output_shape_ops``, as for nonzero)."""

    def define(spec):
        name, args_of = spec.__name__, _Arguments(spec)
        run = _backend(name)

        def eager(*args):
            return tuple(run(*args))

        def impl(*args):
            # a custom op's outputs may not alias each other or its inputs
            return tuple(t.clone() for t in run(*args))

        op = _Op(name, _op_function(name, impl, args_of.sig), fake, eager=eager)

        @functools.wraps(spec)
        def public(*args, **kwargs):
            a = args_of(args, kwargs)
            values = [v.detach() if isinstance(v, Tensor) else v for v in a.values()]
            if dispatch.use_reference(values[0], a.get("r")):
                return _reference(name)(*values)
            return op(*values)

        return public

    return define


def _per_row(x: Tensor, *dtypes):
    return tuple(x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype) if dt is None else dt) for dt in dtypes)


def _listed(x: Tensor, *groups):
    """Fake index lists of data-dependent lengths: ``groups[k]`` lists share the k-th unbacked size."""
    sizes = [torch.library.get_ctx().new_dynamic_size() for _ in groups]
    return tuple(x.new_empty((t,), dtype=torch.int64) for t, g in zip(sizes, groups) for _ in range(g))


@_mining_op(lambda x, *_: _per_row(x, None, torch.int64, torch.bool))
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
    if side not in ("pos", "neg"):
        raise ValueError(f"side must be 'pos' or 'neg', got {side!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if thr_op not in ("", "gt", "lt") or (thr is None) != (thr_op == ""):
        raise ValueError(f"thr_op must be 'gt' or 'lt' together with thr, or '' without; got {thr_op!r}")


@_mining_op(lambda x, *_: _per_row(x, *(None, torch.int64, torch.bool) * 2))
def row_hardest(
    x: Tensor, y: Tensor, r: Optional[Tensor], z: Optional[Tensor], excl: Optional[Tensor], kind: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch-hard mining in one sweep: per anchor i, ``max_{j in P(i)} d'_ij`` (farthest positive) and
    ``min_{j in Q(i)} d'_ij`` (nearest negative).

    The same as ``row_extreme(..., "pos", "max")`` and ``row_extreme(..., "neg", "min")`` (no band, no
    thresholds; ties to the lowest index) from one distance sweep. Returns
    ``(pos_value, pos_index, pos_found, neg_value, neg_index, neg_found)``. Not differentiable: re-evaluate
    the chosen pairs with :func:`pair_values`.
    """


@_mining_op(lambda x, *_: _listed(x, 3))
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


@_mining_op(lambda x, *_: _listed(x, 2, 2))
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


# pair_values: exact d' of listed pairs, differentiable through its own backward op
def _pair_values_setup(ctx, inputs, output):
    x, r, i, j, kind = inputs
    ctx.save_for_backward(output, x, r, i, j)
    ctx.kind, ctx.has_r = kind, r is not None


def _pair_values_backward(ctx, grad):
    values, x, r, i, j = ctx.saved_tensors
    gx, gr = _PAIR_VALUES_BACKWARD(grad, values, x, r if ctx.has_r else None, i, j, ctx.kind)
    return gx, (gr if ctx.has_r else None), None, None, None


def _fake_pair_values_backward(grad, values, x, r, i, j, kind):
    return torch.empty_like(x), (x.new_empty((0, x.shape[1])) if r is None else torch.empty_like(r))


_PAIR_VALUES_BACKWARD = _Op(
    "pair_values_backward",
    _op_function(
        "pair_values_backward", _backend("pair_values_backward"), inspect.signature(portable.pair_values_backward)
    ),
    _fake_pair_values_backward,
)
_PAIR_VALUES = _Op(
    "pair_values",
    _op_function("pair_values", _backend("pair_values"), inspect.signature(portable.pair_values)),
    lambda x, r, i, j, kind: x.new_empty(i.shape, dtype=acc_dtype(x.dtype)),
    _pair_values_setup,
    _pair_values_backward,
)


def pair_values(x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str) -> Tensor:
    """``d'`` of the listed pairs ``(x[i_t], r[j_t])``, computed by direct differences (exact near 0).

    ``r=None`` indexes both sides into ``x``. Returns float32 for fp16/bf16/fp32 inputs (float64 for float64).
    The L2 gradient is ``g (x_i - r_j) / d`` and 0 where ``d = 0``. Memory is O(T) plus a chunk of
    ``(chunk, D)`` within the memory budget; the backward accumulates deterministically.
    """
    _check_kind(kind)
    if dispatch.use_reference(x, r):
        return _reference("pair_values")(x, r, i, j, kind)
    return _PAIR_VALUES(x, r, i.to(torch.int64), j.to(torch.int64), kind)

"""Shared plumbing of the losses and miners: PML's input conventions, and the distance "geometry".

:func:`resolve_inputs` applies PML's rules once (labels moved to the embeddings' device, ``ref_emb=None``
meaning the batch against itself, the diagonal excluded iff ``ref_labels is labels``) and turns them into the
ops' arguments ``(y, r, z, excl)``:

* ``ref_emb`` is ``embeddings`` and ``ref_labels`` is ``labels``: the square case (``r = z = None``);
* ``ref_labels`` is ``labels`` but ``ref_emb`` is another tensor: rectangular, ``excl = arange(N)``;
* otherwise: rectangular, nothing excluded.

:class:`Geometry` gives distances of index pairs in PML's raw convention (a similarity for
``is_inverted`` distances) and lists of pairs / triplets, through :mod:`fastdml.ops` when the distance has a
fused spec, else through the distance object's own matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _nanrule, ops, reference
from . import _validation as V
from .distances import fused_spec

INF = math.inf


@dataclass
class Inputs:
    embeddings: torch.Tensor
    labels: torch.Tensor | None
    ref_emb: torch.Tensor  # resolved: embeddings when not given
    ref_labels: torch.Tensor | None  # resolved as PML (None only when labels is None or not given with ref_emb)
    square: bool
    y: torch.Tensor | None  # int64 ids for the ops
    z: torch.Tensor | None  # None in the square case
    excl: torch.Tensor | None
    diag: bool  # PML's `ref_labels is labels`

    @property
    def n(self):
        return self.embeddings.shape[0]

    @property
    def m(self):
        return self.ref_emb.shape[0]


def overrides_hook(obj, *names: str) -> bool:
    """Whether ``type(obj)`` takes any of the methods ``names`` from a class outside fastdml and PML (a user's
    subclass overriding a PML hook): fastdml's fused paths replace those hooks, so such an object takes the
    general path."""
    for name in names:
        for klass in type(obj).__mro__:
            if name in vars(klass):
                if not klass.__module__.startswith(("fastdml.", "pytorch_metric_learning.")):
                    return True
                break
    return False


def resolve_inputs(embeddings, labels, ref_emb, ref_labels, labels_required: bool = True, distance=None) -> Inputs:
    """Validate and resolve a PML-style call (see the module docstring). A ``distance`` whose ``check_shapes``
    is a user's override decides which embeddings shapes are valid (PML's rule); otherwise they are (N, D)."""
    if distance is not None and overrides_hook(distance, "check_shapes"):
        if not torch.is_tensor(embeddings) or embeddings.ndim < 1:
            raise ValueError(f"embeddings must be a tensor with a batch dimension, got {type(embeddings).__name__}")
        distance.check_shapes(embeddings, ref_emb)
        check_ref = lambda e, r, name: r  # noqa: E731
    else:
        V.check_embeddings(embeddings, "embeddings")
        check_ref = V.check_ref
    n = embeddings.shape[0]
    if labels is None:
        if labels_required:
            raise ValueError("labels are required (or pass an indices_tuple to a loss)")
    else:
        V.check_labels(labels, n, "labels")
        labels = V.move_labels(labels, embeddings.device)
    if ref_emb is not None:
        check_ref(embeddings, ref_emb, "ref_emb")
        if ref_labels is not None:
            V.check_labels(ref_labels, ref_emb.shape[0], "ref_labels")
            ref_labels = V.move_labels(ref_labels, ref_emb.device)
    else:
        # PML's set_ref_emb: without ref_emb the batch is compared with itself, whatever ref_labels says
        ref_emb, ref_labels = embeddings, labels
    m = ref_emb.shape[0]
    z_obj = labels if ref_labels is None else ref_labels
    diag = z_obj is labels
    square = diag and ref_emb is embeddings
    y = z = excl = None
    if labels is not None:
        if diag and m != n:
            raise ValueError(
                f"ref_labels is required when ref_emb ({m} rows) is given with {n} embeddings "
                "(without it the labels are used for both, which needs as many rows)"
            )
        if square:
            y, _ = V.labels_as_int64(labels, None)
        else:
            y, z = V.labels_as_int64(labels, z_obj)
            if diag:
                excl = torch.arange(n, device=embeddings.device)
    return Inputs(embeddings, labels, ref_emb, ref_labels, square, y, z, excl, diag)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float32 for float16/bfloat16 embeddings (the final value is rounded to
    the embeddings' dtype once, at the end), else the embeddings' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# F.normalize's eps: rows with a smaller norm are divided by eps instead (the same values as PML's)
NORMALIZE_EPS = 1e-12


class _RowNormalize(torch.autograd.Function):
    """``y = x / max(|x|, eps)`` per row, as ``F.normalize(x, p=2, dim=1)`` (the same forward ops), with the
    closed-form backward ``dx = (g - y (g.y)) / n`` (``n = |x|``; rows with ``|x| < eps``: ``dx = g / eps``).

    Autograd through ``F.normalize`` runs the norm's, the clamp's and the division's backward (about ten
    passes over the (N, D) rows); this is four, which halves the normalization's share of a batch-hard step.
    """

    @staticmethod
    def forward(ctx, x):
        n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        denom = n.clamp_min(NORMALIZE_EPS)
        y = x / denom
        ctx.save_for_backward(y, denom, n >= NORMALIZE_EPS)
        return y

    @staticmethod
    def backward(ctx, g):
        y, denom, projected = ctx.saved_tensors
        # (the clamp passes the norm's gradient where |x| >= eps, as clamp_min's backward)
        dot = torch.where(projected, (g * y).sum(1, keepdim=True), 0.0)
        return torch.addcmul(g, y, dot, value=-1.0).div_(denom)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """L2 normalization of the rows (``F.normalize(x, p=2, dim=1)``), in float32 for half-precision rows
    (rounding the unit rows back to fp16/bf16 would cost more than the ops' fp32 accumulation saves)."""
    x = x.to(acc_dtype(x.dtype))
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.normalize(x, p=2, dim=1, eps=NORMALIZE_EPS)
    return _RowNormalize.apply(x)


class Geometry:
    """Distances for one call: ``raw(i, j)`` (PML's convention, differentiable), lists, row extremes.

    With a fused spec ``(kind, normalize)`` the embeddings are L2-normalized once (if asked) and every value
    comes from :mod:`fastdml.ops` (exact, O(T D)); otherwise (or ``generic=True``: PML's own algorithm, as the
    public hooks run it) the distance object's matrix is built once.
    """

    def __init__(self, distance, inp: Inputs, generic: bool = False):
        self.distance = distance
        self.inp = inp
        self.spec = None if generic else fused_spec(distance)
        self.inverted = bool(getattr(distance, "is_inverted", False))
        self._mat = None
        if self.spec is not None:
            kind, normalize = self.spec
            self.kind = kind
            x = inp.embeddings
            self.x = _normalize(x) if normalize else x
            if inp.square:
                self.r = None
            elif inp.ref_emb is x:
                self.r = self.x
            else:
                self.r = _normalize(inp.ref_emb) if normalize else inp.ref_emb

    # -- the generic path's matrix --
    @property
    def mat(self):
        """The distance object's (N, M) matrix (raw convention), built once."""
        if self._mat is None:
            self._mat = self.distance(self.inp.embeddings, self.inp.ref_emb)
        return self._mat

    def dprime_matrix(self):
        """d' (larger is farther) of the generic path."""
        return -self.mat if self.inverted else self.mat

    def masks(self):
        inp = self.inp
        return reference.masks(inp.y, inp.z, inp.excl, inp.square)

    # -- values --
    def raw(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Distance (similarity, for inverted distances) of the pairs (embeddings[i], ref_emb[j])."""
        if self.spec is None:
            return self.mat[i, j]
        # float32 for half-precision embeddings: the terms and their reduction stay fp32 until the end
        d = ops.pair_values(self.x, self.r, i, j, self.kind).to(acc_dtype(self.inp.embeddings.dtype))
        return -d if self.kind == "dot" else d

    def raw_two(self, i1, j1, i2, j2):
        """``(raw(i1, j1), raw(i2, j2))`` with one pair evaluation (one op forward and backward) for the
        fused distances: the anchor-positive and anchor-negative distances of a triplet loss."""
        if self.spec is None:
            return self.raw(i1, j1), self.raw(i2, j2)
        both = self.raw(torch.cat([i1, i2]), torch.cat([j1, j2]))
        return both[: i1.shape[0]], both[i1.shape[0] :]

    def dprime_two(self, i1, j1, i2, j2):
        """``(dprime(i1, j1), dprime(i2, j2))`` with one pair evaluation (see :meth:`raw_two`)."""
        v1, v2 = self.raw_two(i1, j1, i2, j2)
        return (-v1, -v2) if self.inverted else (v1, v2)

    def dprime(self, i, j):
        v = self.raw(i, j)
        return -v if self.inverted else v

    # -- lists (no gradient) --
    def pair_list(self, pos_lo=-INF, neg_hi=INF):
        inp = self.inp
        if self.spec is not None:
            return ops.pair_list(self.x, inp.y, self.r, inp.z, inp.excl, self.kind, pos_lo, neg_hi)
        pos, neg = self.masks()
        return reference.pair_list_from_matrix(self.dprime_matrix(), pos, neg, pos_lo, neg_hi)

    def triplet_list(self, band_lo=-INF, band_hi=INF):
        inp = self.inp
        if self.spec is not None:
            return ops.triplet_list(self.x, inp.y, self.r, inp.z, inp.excl, self.kind, band_lo, band_hi)
        pos, neg = self.masks()
        return reference.triplet_list_from_matrix(self.dprime_matrix(), pos, neg, band_lo, band_hi)

    def row_extreme(self, side, mode, lo=-INF, hi=INF, thr=None, thr_op=""):
        """(value d', index, found) per anchor; see :func:`fastdml.ops.row_extreme`."""
        inp = self.inp
        if self.spec is not None:
            return ops.row_extreme(self.x, inp.y, self.r, inp.z, inp.excl, self.kind, side, mode, lo, hi, thr, thr_op)
        pos, neg = self.masks()
        dmat = self.dprime_matrix()  # built (and cached) with its graph: raw() reuses it for the gradient
        with torch.no_grad():
            return reference.row_extreme_from_matrix(dmat.detach(), pos, neg, side, mode, lo, hi, thr, thr_op)

    def row_hardest(self):
        """Batch-hard mining in one sweep: ``(pos_value, pos_index, pos_found, neg_value, neg_index, neg_found)``,
        per anchor the farthest positive (max d') and the nearest negative (min d'); see
        :func:`fastdml.ops.row_hardest`."""
        inp = self.inp
        if self.spec is not None:
            return ops.row_hardest(self.x, inp.y, self.r, inp.z, inp.excl, self.kind)
        pos, neg = self.masks()
        dmat = self.dprime_matrix()  # built (and cached) with its graph: raw() reuses it for the gradient
        with torch.no_grad():
            return reference.row_hardest_from_matrix(dmat.detach(), pos, neg)

    def raw_interval_to_dprime(self, lo, hi):
        """A closed interval of raw values as an interval of d' (flipped for similarities)."""
        lo = -INF if lo is None else float(lo)
        hi = INF if hi is None else float(hi)
        return (-hi, -lo) if self.inverted else (lo, hi)


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """PML's zero loss, ``sum(embeddings * 0)``: 0 with zero gradient, attached to the graph (NaN when the
    embeddings hold NaN or infinity, as PML's). The one place every loss, reducer and path takes it from."""
    return _nanrule.zero_loss(embeddings)


@dataclass(frozen=True, eq=False)
class BandRecord:
    """How a listing miner selected (for fastdml's losses to evaluate it fused, listing nothing): ``op`` is
    ``"triplet_band"`` (``lo < d'_an - d'_ap <= hi``) or ``"pair_band"`` (positives ``d' > lo``, negatives
    ``d' < hi``), on the tensors ``x`` / ``ref`` at ``versions``, with the ops' arguments of that call."""

    op: str
    x: torch.Tensor
    ref: torch.Tensor
    versions: tuple | None  # None when traced (a graph cannot branch on version counters)
    spec: tuple
    square: bool
    y: torch.Tensor | None
    z: torch.Tensor | None
    excl: torch.Tensor | None
    band: tuple

    @classmethod
    def of(cls, op: str, inp: Inputs, geo: Geometry, band: tuple) -> BandRecord:
        versions = None if torch.compiler.is_compiling() else (inp.embeddings._version, inp.ref_emb._version)
        return cls(op, inp.embeddings, inp.ref_emb, versions, geo.spec, inp.square, inp.y, inp.z, inp.excl, band)

    def usable(self, op: str, inp: Inputs, geo: Geometry) -> bool:
        """Mined by ``op`` on the very same tensors (identity, unmodified since) with the same fused spec."""
        if self.op != op or self.x is not inp.embeddings or self.ref is not inp.ref_emb or self.spec != geo.spec:
            return False
        return torch.compiler.is_compiling() or self.versions == (inp.embeddings._version, inp.ref_emb._version)


@dataclass(frozen=True, eq=False)
class RowPairsRecord:
    """One positive ``p[a]`` and one negative ``neg[a]`` per anchor ``a`` of an (n, m) batch, the anchors
    without ``valid`` masked (BatchHardMiner / BatchEasyHardMiner): indices, usable on any batch of that shape."""

    n: int
    m: int
    valid: torch.Tensor
    p: torch.Tensor
    neg: torch.Tensor


def window_value(stats_s, stats_c, window, embeddings):
    """The reducer's value from a sum and a count: ``S / C`` (or ``S``), and PML's zero loss when ``C = 0``.

    No host synchronisation: with ``C = 0`` nothing was counted, so ``S`` is an exact 0 whose gradient is 0
    (still attached to the embeddings' graph through the op), and ``S / max(C, 1)`` is that 0.
    """
    val = stats_s / stats_c.clamp_min(1) if window[2] else stats_s
    val = val.to(acc_dtype(embeddings.dtype))  # (the loss rounds to the embeddings' dtype at the very end)
    val = _nanrule.unless_counted(val, stats_c, embeddings)  # C = 0: PML's zero loss (NaN for NaN embeddings)
    if embeddings.requires_grad and not val.requires_grad:
        val = val + zero_loss(embeddings)  # keep the result attached to the graph (PML's zero loss)
    return val

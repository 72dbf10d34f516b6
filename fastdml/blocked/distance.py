"""Exact signed-distance blocks and the common GEMM-shaped gradient pass of the blocked CPU path.

Distances (``kind``; d' is "larger is farther")::

    "dot":  d'_ij = -(x_i . r_j)                                   one GEMM
    "sql2": d'_ij = q_ij = max(|x_i|^2 + |r_j|^2 - 2 x_i . r_j, 0)   one GEMM + exact recompute
    "l2":   d'_ij = sqrt(q_ij)

The expansion of q cancels near 0 (error ~ eps (|x|^2 + |r|^2), which sqrt turns into ~sqrt(eps) on d).
So every entry with ``q <= 1e-2 (|x_i|^2 + |r_j|^2)`` (near-duplicates; few in practice) is recomputed by
direct differences ``sum_k (x_ik - r_jk)^2``, and for ``D <= 4`` the whole block is computed by direct
differences. Outside the flagged set the relative error of q is below ~100 D eps: fp32 results stay within
rtol 1e-4 of float64.

Gradient (docs/ARCHITECTURE.md, the op contract): given pair weights ``G_k = dS_k/dd'`` of a
row block, with ``c = G / d`` (L2; 0 at d = 0), ``c = 2 G`` (squared L2)::

    dS/dx_i += (sum_j c_ij) x_i - sum_j c_ij r_j        (row side: C @ R)
    dS/dr_j += (sum_i c_ij) r_j - sum_i c_ij x_i        (column side: C^T @ X_b)

and for "dot" ``dS/dx_i -= sum_j G_ij r_j``, ``dS/dr_j -= sum_i G_ij x_i``. In the square case both sides
land on x; when G is symmetric (contrastive) the column side equals the row side, so it is added twice
instead of computed. For L2 the expanded row side ``c x_i - c r_j`` loses ~eps |x| c for near-duplicates
(c = g/d is large there), so flagged pairs are taken out of C and added by direct differences
``c_ij (x_i - r_j)`` (index_add_: deterministic on the CPU).
"""

from __future__ import annotations

import math

import torch

from ..portable.rows import acc_dtype, add_rows  # noqa: F401  (re-exported: the sweeps import them from here)
from . import budget

KINDS = ("l2", "sql2", "dot")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# entries with q <= NEAR_REL * (|x_i|^2 + |r_j|^2) are recomputed by direct differences
NEAR_REL = 1e-2
# up to this dimension the whole block is computed by direct differences (cheap, exact)
DIRECT_MAX_D = 4


def _check_labels(name: str, labels, n: int, device, where: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor of int64 labels, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{where}: {name} has {labels.shape[0]} labels but its embeddings have {n} rows")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must hold integer labels (int64), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"{where}: {name} is on {labels.device} but x is on {device}")
    return labels.to(torch.int64).contiguous()


class Problem:
    """The validated inputs of one op call, in the accumulation dtype, plus what every block needs.

    Attributes: ``x`` (N, D), ``r`` (M, D) (``r is x`` in the square case), ``y`` (N,), ``z`` (M,),
    ``excl`` (N,) int64 or None (rectangular only; None when nothing is excluded), ``square``, ``kind``,
    ``acc`` (accumulation dtype), ``xn``/``rn`` squared norms (l2/sql2), ``direct`` (small D: direct differences).
    """

    def __init__(self, x, y, r, z, excl, kind: str, where: str):
        if kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{where}: x must be 2-D (N, D), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: x must be float16/bfloat16/float32/float64, got {x.dtype}")
        if (r is None) != (z is None):
            raise ValueError(f"{where}: r and z must be given together (or both None for the square case)")
        self.kind = kind
        self.acc = acc_dtype(x.dtype)
        self.square = r is None
        self.x = x.detach().to(self.acc).contiguous()
        self.N, self.D = self.x.shape
        self.y = _check_labels("y", y, self.N, x.device, where)
        if self.square:
            if excl is not None and bool((excl >= 0).any()):
                raise ValueError(f"{where}: excl is only for the rectangular case (r given); got it with r=None")
            self.r, self.z, self.excl = self.x, self.y, None
        else:
            if not isinstance(r, torch.Tensor) or r.dim() != 2:
                raise ValueError(f"{where}: r must be a 2-D tensor (M, D), got {getattr(r, 'shape', type(r))}")
            if r.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{where}: r must be float16/bfloat16/float32/float64, got {r.dtype}")
            if r.shape[1] != self.D:
                raise ValueError(f"{where}: r has dimension {r.shape[1]} but x has {self.D}")
            if r.device != x.device:
                raise ValueError(f"{where}: r is on {r.device} but x is on {x.device}")
            self.r = r.detach().to(self.acc).contiguous()
            self.z = _check_labels("z", z, self.r.shape[0], x.device, where)
            self.excl = None
            if excl is not None:
                e = _check_labels("excl", excl, self.N, x.device, where)
                if bool((e >= self.r.shape[0]).any()):
                    raise ValueError(f"{where}: excl holds an index >= M = {self.r.shape[0]}")
                if bool((e >= 0).any()):
                    self.excl = e
        self.M = self.r.shape[0]
        self.device = x.device
        self.esize = torch.finfo(self.acc).bits // 8
        self.direct = kind != "dot" and self.D <= DIRECT_MAX_D
        if kind != "dot":
            self.xn = (self.x * self.x).sum(1)
            self.rn = self.xn if self.square else (self.r * self.r).sum(1)
        self._rt = None
        self._aug = None
        self._canon = None
        self._rn_max = None

    @property
    def rn_max(self) -> float:
        """``max_j |r_j|^2`` (l2/sql2), read from the tensor on first use (a host sync the sweeps that never
        need it do not pay)."""
        if self._rn_max is None:
            self._rn_max = float(self.rn.max()) if self.M > 0 else 0.0
        return self._rn_max

    # ------------------------------------------------------------------------------------------------
    def sorted_by_label(self):
        """``(Ps, rperm, cperm)``: the same problem with rows sorted by y and columns by z (stable), so each
        anchor's positives are one contiguous run of columns. ``Ps.x = x[rperm]``, ``Ps.r = r[cperm]``; the
        square case stays square (rperm = cperm), ``excl`` is mapped to the new column numbering.
        Only for order-free results (sums, counts, gradients scattered back with the permutations)."""
        rperm = torch.argsort(self.y, stable=True)
        cperm = rperm if self.square else torch.argsort(self.z, stable=True)
        Ps = object.__new__(Problem)
        Ps.__dict__.update(self.__dict__)
        Ps.x = self.x[rperm]
        Ps.y = self.y[rperm]
        if self.square:
            Ps.r, Ps.z = Ps.x, Ps.y
        else:
            Ps.r = self.r[cperm]
            Ps.z = self.z[cperm]
            if self.excl is not None:
                inv = torch.empty_like(cperm)
                inv[cperm] = torch.arange(self.M, device=self.device)
                ex = self.excl[rperm]
                Ps.excl = torch.where(ex >= 0, inv[ex.clamp_min(0)], ex)
        if self.kind != "dot":
            Ps.xn = self.xn[rperm]
            Ps.rn = Ps.xn if self.square else self.rn[cperm]
        Ps._rt = None
        Ps._aug = None
        Ps._canon = None
        return Ps, rperm, cperm

    def rt(self) -> torch.Tensor:
        """R^T, contiguous (D, M) (for the direct small-D distances)."""
        if self._rt is None:
            self._rt = self.r.t().contiguous()
        return self._rt

    def excluded_cols(self, s: int, e: int):
        """(rows, cols) of the excluded pairs of block rows s:e (block-relative rows), or None."""
        if self.square:
            n = e - s
            rows = torch.arange(n, device=self.device)
            return rows, rows + s
        if self.excl is None:
            return None
        ex = self.excl[s:e]
        rows = torch.nonzero(ex >= 0).flatten()
        return rows, ex[rows]

    def masks(self, s: int, e: int, out=None):
        """Boolean (b, M) positives and negatives of block rows s:e (excluded pairs in neither), written into
        ``out = (same, diff)`` when given (workspace buffers)."""
        same, diff = out if out is not None else (None, None)
        same = torch.eq(self.y[s:e, None], self.z[None, :], out=same)
        diff = torch.logical_not(same, out=diff)
        ex = self.excluded_cols(s, e)
        if ex is not None:
            same[ex] = False
            diff[ex] = False
        return same, diff


# ----------------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------------
def _direct_q(xb: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    """q = sum_k (x_ik - r_jk)^2 for small D, one (b, M) pass per coordinate."""
    q = torch.zeros((xb.shape[0], rt.shape[1]), dtype=xb.dtype, device=xb.device)
    for k in range(xb.shape[1]):
        diff = xb[:, k : k + 1] - rt[k : k + 1, :]
        q.addcmul_(diff, diff)
    return q


def _recompute_pairs(P: Problem, xb: torch.Tensor, q: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, c0: int = 0):
    """q[ii, jj] = |x_ii - r_(c0 + jj)|^2 by direct differences, in chunks of at most a quarter of the budget."""
    chunk = max(1, budget.budget_bytes() // (4 * (P.D + 4) * P.esize * 3))
    for c in range(0, ii.numel(), chunk):
        a, b = ii[c : c + chunk], jj[c : c + chunk]
        diff = xb[a] - P.r[b + c0]
        q[a, b] = (diff * diff).sum(1)


def _augmented(P: Problem):
    """``([x, |x|^2, 1], [-2 r, 1, |r|^2])`` so that one GEMM gives q = |x|^2 + |r|^2 - 2 x.r (cached)."""
    if P._aug is None:
        # written in place: no (M, D) temporary before the copy, an O(M D) pass less per call
        xa = torch.empty((P.N, P.D + 2), dtype=P.acc, device=P.device)
        xa[:, : P.D] = P.x
        xa[:, P.D] = P.xn
        xa[:, P.D + 1] = 1.0
        ra = torch.empty((P.M, P.D + 2), dtype=P.acc, device=P.device)
        torch.mul(P.r, -2.0, out=ra[:, : P.D])
        ra[:, P.D] = 1.0
        ra[:, P.D + 1] = P.rn
        P._aug = (xa, ra)
    return P._aug


_HASH_VECTORS: dict = {}


def _hash_vector(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fixed random (d,) vector per (d, dtype, device), drawn once (a generator and a draw per call cost
    about as much as the hash itself at N = 1024)."""
    key = (d, dtype, str(device))
    v = _HASH_VECTORS.get(key)
    if v is None:
        g = torch.Generator(device="cpu").manual_seed(12345)
        v = torch.randn(d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        _HASH_VECTORS[key] = v
    return v


def canonical_columns(P: Problem):
    """For references with exact duplicate rows: ``canon[j]`` = the lowest index of r_j's copies (else None).

    The GEMM may round the distances to two identical references differently (BLAS sums depend on the
    column's position), and ties between copies decide semihard's n*, row_extreme's index and band edges
    (``d'_an - d'_ap = 0``). Copying each duplicate's column from its first copy makes copies tie exactly,
    as they do in the reference. Detection: one row hash (a per-row sum: identical rows give identical
    sums); the exact ``torch.unique`` runs only on the rows whose hash collides with another's
    (``torch.unique(dim=0)`` over a whole large memory queue costs more than the loss itself).
    """
    if P._canon is None:
        P._canon = False
        if P.M > 1:
            h = (P.r * _hash_vector(P.D, P.acc, P.device)).sum(1)
            sh, order = torch.sort(h)
            tie = sh[1:] == sh[:-1]
            if bool(tie.any()):
                # candidates: every row sharing its hash with another (exact copies always do), ascending
                cand_mask = torch.zeros(P.M, dtype=torch.bool, device=P.device)
                cand_mask[1:] |= tie
                cand_mask[:-1] |= tie
                cand = torch.sort(order[cand_mask]).values
                _, inverse = torch.unique(P.r[cand], dim=0, return_inverse=True)
                first = torch.full((int(inverse.max()) + 1,), P.M, dtype=torch.int64, device=P.device)
                first.scatter_reduce_(0, inverse, cand, reduce="amin")
                canon = torch.arange(P.M, device=P.device)
                canon[cand] = first[inverse]
                if bool((canon[cand] != cand).any()):
                    P._canon = canon
    return None if P._canon is False else P._canon


def distances(P: Problem, s: int, e: int, root: bool = True, cols=None, out=None, row_min=None):
    """d' of block rows s:e against the references (all, or the column range ``cols = (c0, c1)``):
    ``(d (b, w) in P.acc, flagged)``.

    ``flagged`` is ``(ii, jj)`` (block-relative rows and columns) of the near-duplicate entries
    (``q <= NEAR_REL (|x_i|^2 + |r_j|^2)``; l2/sql2 only, else None), recomputed by direct differences.
    In the square case the diagonal is exactly 0 (and not flagged: it is excluded from every loss).
    ``root=False`` returns q instead of sqrt(q) for "l2" (for order-only uses: sqrt is monotone).
    A column range is not allowed when the references hold exact duplicates (:func:`canonical_columns`
    copies a duplicate's column from its first copy, which may lie outside the range). ``out``: an optional
    contiguous (b, w) buffer the GEMM writes into (reused across blocks: fresh memory costs page faults).
    ``row_min``: an optional list; for l2/sql2 the near-duplicate pre-check's row minima of q (the square
    diagonal left out; before flagged entries are recomputed) are appended to it.
    """
    xb = P.x[s:e]
    c0, c1 = (0, P.M) if cols is None else cols
    canon = canonical_columns(P)
    if canon is not None and (c0, c1) != (0, P.M):
        raise RuntimeError("distances: a column range needs references without exact duplicates")
    if P.kind == "dot":
        d = torch.mm(xb, P.r[c0:c1].t(), out=out).neg_()
        return (d if canon is None else d.index_select(1, canon)), None
    flagged = None
    if P.direct:
        q = _direct_q(xb, P.rt()[:, c0:c1])
    else:
        # q = |x|^2 + |r|^2 - 2 x.r in one GEMM over augmented rows. Every entry left un-flagged below has
        # q > NEAR (|x_i|^2 + |r_j|^2) >= 0, and flagged ones are recomputed exactly: no clamp needed.
        xa, ra = _augmented(P)
        q = torch.mm(xa[s:e], ra[c0:c1].t(), out=out)
    # near-duplicates: a cheap row-wise pre-check (min_j q_ij <= NEAR (|x_i|^2 + max |r|^2): one read-only
    # reduction, the square diagonal masked), then the exact per-entry rule on the few candidate rows.
    # The GEMM path recomputes them; both paths give them to the gradient's direct-difference branch.
    thr = NEAR_REL * (P.xn[s:e] + P.rn_max)
    if P.square:
        diag = q.diagonal(s - c0)  # global diagonal i == j inside this block (empty when it misses)
        diag.fill_(math.inf)
    if q.shape[1]:
        mins = q.amin(1)
        rows = torch.nonzero(mins <= thr).flatten()
        if row_min is not None:
            row_min.append(mins)
    else:
        rows = q.new_zeros(0, dtype=torch.long)
    if P.square:
        diag.zero_()
    if rows.numel():
        qr = q[rows]
        cand = qr <= NEAR_REL * (P.xn[s + rows][:, None] + P.rn[None, c0:c1])
        if P.square:
            on_diag = (rows + s - c0 >= 0) & (rows + s - c0 < c1 - c0)
            rd = rows[on_diag]
            cand[torch.nonzero(on_diag).flatten(), rd + s - c0] = False
        ri, jj = torch.nonzero(cand, as_tuple=True)
        if ri.numel():
            ii = rows[ri]
            if not P.direct:
                _recompute_pairs(P, xb, q, ii, jj, c0)
            flagged = (ii, jj)
    if P.kind == "l2" and root:
        q.sqrt_()
    if canon is not None:
        q = q.index_select(1, canon)
    return q, flagged


# ----------------------------------------------------------------------------------------------------
# gradient pass
# ----------------------------------------------------------------------------------------------------
def new_parts(P: Problem, k: int, need_grad: bool, need_grad_r: bool = True):
    """Zeroed gradient parts ``gx (k, N, D)``, ``gr (k, M, D)`` (empty when not needed / square case;
    ``gr`` is (0, M, D) when the references need no gradient, ``need_grad_r=False``)."""
    kk = k if need_grad else 0
    gx = torch.zeros((kk, P.N, P.D), dtype=P.acc, device=P.device)
    if P.square:
        gr = torch.zeros((0, 0, P.D), dtype=P.acc, device=P.device)
    else:
        gr = torch.zeros((kk if need_grad_r else 0, P.M, P.D), dtype=P.acc, device=P.device)
    return gx, gr


def accumulate_grad(
    P: Problem,
    s: int,
    e: int,
    d,
    flagged,
    G: torch.Tensor,
    gx,
    gr,
    symmetric: bool = False,
    scratch: torch.Tensor | None = None,
):
    """Add ``dS_k/dx`` (rows s:e, row side) and ``dS_k/dr`` (column side) of one block into gx, gr.

    ``G`` (k, b, M): pair weights ``dS_k/dd'_ij`` of the block (0 on pairs outside the loss; it is consumed:
    modified in place). ``d`` (b, M): the block's d' (for L2). ``symmetric``: square case with
    ``G_ij = G_ji`` over the whole matrix, so the column side equals the row side (added twice).
    In the square case the column side lands on gx. In the rectangular case an empty ``gr`` (0, M, D)
    (``new_parts(..., need_grad_r=False)``: references without gradient) skips the column side entirely.
    ``scratch``: an optional (b, M) buffer for 1/d (a workspace buffer; :mod:`.workspace`).
    """
    k, b, m = G.shape
    xb = P.x[s:e]
    gcol = gx if P.square else gr
    row_scale = 2.0 if symmetric else 1.0
    # the column side: in the square case (unless symmetric) it lands on gx; rectangular only when r needs it
    want_col = not symmetric and (P.square or gr.shape[0] > 0)
    if P.kind == "dot":
        # d' = -x.r: dS/dx_i = -sum_j G_ij r_j, dS/dr_j = -sum_i G_ij x_i
        gx[:, s:e].sub_(torch.matmul(G, P.r), alpha=row_scale)
        if want_col:
            gcol.sub_(torch.matmul(G.transpose(1, 2), xb))
        return
    wf = None
    if P.kind == "sql2":
        C = G
        scale = 2.0
    else:
        scale = 1.0
        inv = torch.reciprocal(d, out=scratch)
        if P.square:
            inv.diagonal(s).zero_()
        if flagged is not None:
            ii, jj = flagged
            df = d[ii, jj]
            gf = G[:, ii, jj]
            # direct-difference weights of the flagged pairs: g / d, 0 at d = 0
            wf = torch.where(df > 0, gf / torch.where(df > 0, df, torch.ones_like(df)), torch.zeros_like(gf))
            inv[ii, jj] = 0.0
        # d = 0 happens only on the diagonal (zeroed) and for flagged pairs (q <= NEAR (|x|^2 + |r|^2)),
        # so inv is finite everywhere and excluded pairs (G = 0) contribute exactly 0
        C = G.mul_(inv)
    rowsum = C.sum(2, keepdim=True)  # (k, b, 1)
    row = torch.matmul(C, P.r)  # (k, b, D)
    row.neg_().addcmul_(rowsum, xb.unsqueeze(0))
    gx[:, s:e].add_(row, alpha=scale * row_scale)
    if want_col:
        colsum = C.sum(1).unsqueeze(2)  # (k, M, 1)
        col = torch.matmul(C.transpose(1, 2), xb)  # (k, M, D)
        col.neg_().addcmul_(colsum, P.r.unsqueeze(0))
        gcol.add_(col, alpha=scale)
    if wf is not None:
        ii, jj = flagged
        diff = xb[ii] - P.r[jj]  # (F, D)
        for kk in range(k):
            contrib = wf[kk].unsqueeze(1) * diff
            gx[kk].index_add_(0, ii + s, contrib, alpha=row_scale)
            if want_col:
                gcol[kk].index_add_(0, jj, contrib, alpha=-1.0)

"""The reference formulation of every primitive op: the oracle of the tests.

Each function here materializes the full (N, M) signed-distance matrix d' (and, for the triplet ops,
per-anchor (M, M) blocks of triplets), builds boolean masks and index lists, and lets plain torch
autograd differentiate it. It is the simplest obviously-correct code for the contract fixed in
``docs/ARCHITECTURE.md``; nothing else in fastdml re-implements it, and every fast path is tested
against it. It is also the pure-PyTorch baseline of the benchmarks.

Conventions (shared with the blocked and Triton backends):

* ``r=None`` (and ``z=None``) is the **square case**: ``r = x``, ``z = y`` and the diagonal pair ``(i, i)``
  is excluded from both positives and negatives.
* ``excl`` (rectangular case only): ``excl[i]`` is a reference index that query ``i`` must skip (``-1``: none).
* positives of anchor ``i``: ``P(i) = {j : z_j == y_i, j not excluded}``; negatives
  ``Q(i) = {j : z_j != y_i, j not excluded}``.
* d' is "larger is farther" for every ``kind``: ``"l2"`` ``|x_i - r_j|``, ``"sql2"`` ``|x_i - r_j|^2``
  (both by direct differences, exact near 0), ``"dot"`` ``-(x_i . r_j)``.
* An **infinite bound imposes no condition** (so a NaN distance or term passes it and NaN propagates,
  as in PML's mean); a finite bound is a strict (or, where stated, non-strict) comparison, which a NaN
  fails (as PML's miners and threshold reducers drop NaN).
* Sums and counts come back as float64; the sums keep the autograd graph (terms are computed in
  x's dtype, float32 for float16/bfloat16 inputs, then cast to float64 before summing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _nanrule

KINDS = ("l2", "sql2", "dot")

# elements of the (rows, M, D) difference block built per chunk by the direct-difference distances
_CHUNK_ELEMS = 1 << 22


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _safe_sqrt(q: torch.Tensor) -> torch.Tensor:
    """sqrt(q) for q >= 0 with gradient 0 (not inf/NaN) where q == 0: the subgradient PML's cdist uses.

    (q comes from direct differences, so it is never negative; a NaN q stays NaN.)
    """
    nonzero = q != 0
    q_safe = torch.where(nonzero, q, torch.ones_like(q))
    return torch.where(nonzero, torch.sqrt(q_safe), torch.zeros_like(q))


def _sq_dist_direct(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """q_ij = sum_k (x_ik - r_jk)^2 by direct differences (no |a|^2 + |b|^2 - 2ab cancellation), chunked."""
    n, m = x.shape[0], r.shape[0]
    d = max(x.shape[1], 1)
    rows = max(1, _CHUNK_ELEMS // max(m * d, 1))
    out = []
    for s in range(0, n, rows):
        diff = x[s : s + rows, None, :] - r[None, :, :]
        out.append((diff * diff).sum(-1))
    if not out:
        # n == 0: an empty (0, M) result that is still attached to x's graph
        return ((x[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    return torch.cat(out, 0)


def signed_distance_matrix(x: torch.Tensor, r: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The (N, M) signed distance d' (``r=None``: ``r = x``).

    ``"l2"``: ``d'_ij = sqrt(sum_k (x_ik - r_jk)^2)`` with gradient 0 at d' = 0;
    ``"sql2"``: ``d'_ij = sum_k (x_ik - r_jk)^2``; ``"dot"``: ``d'_ij = -(x_i . r_j)``.
    """
    _check_kind(kind)
    if r is None:
        r = x
    if kind == "dot":
        return -(x @ r.T)
    q = _sq_dist_direct(x, r)
    d = q if kind == "sql2" else _safe_sqrt(q)
    bad_x, bad_r = _nanrule.extreme_rows(x), _nanrule.extreme_rows(r)
    if bool(bad_x.any()) or bool(bad_r.any()):
        # a pair with a non-finite or overflowing row: PML's torch.cdist, whose NaN/inf pattern differs from
        # direct differences (its |a|^2 + |b|^2 - 2 a.b form gives NaN where differences give inf)
        # (its values only: the gradient stays that of the direct differences, so a pair no term uses passes 0)
        with torch.no_grad():
            pml = torch.cdist(x, r)
            pml = pml * pml if kind == "sql2" else pml
        d = torch.where(bad_x[:, None] | bad_r[None, :], _ValueOf.apply(d, pml), d)
    return d


class _ValueOf(torch.autograd.Function):
    """``v``'s values with ``d``'s gradient (identity backward into ``d``)."""

    @staticmethod
    def forward(ctx, d, v):
        return v.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def masks(
    y: torch.Tensor, z: torch.Tensor | None, excl: torch.Tensor | None, square: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (N, M) masks of positives ``z_j == y_i`` and negatives ``z_j != y_i``.

    ``square``: ``z = y`` and the diagonal is removed from both. Otherwise ``excl[i] >= 0`` removes the
    pair ``(i, excl[i])`` from both.
    """
    if square or z is None:
        z = y
    eq = y[:, None] == z[None, :]
    keep = torch.ones_like(eq)
    if square:
        keep.fill_diagonal_(False)
    elif excl is not None:
        rows = torch.nonzero(excl >= 0).flatten()
        keep[rows, excl[rows]] = False
    return eq & keep, (~eq) & keep


def _gt(v: torch.Tensor, bound: float) -> torch.Tensor:
    """``v > bound``; no condition when ``bound`` is -inf (NaN passes)."""
    if bound == -math.inf:
        return torch.ones_like(v, dtype=torch.bool)
    return v > bound


def _lt(v: torch.Tensor, bound: float) -> torch.Tensor:
    """``v < bound``; no condition when ``bound`` is +inf (NaN passes)."""
    if bound == math.inf:
        return torch.ones_like(v, dtype=torch.bool)
    return v < bound


def _ge(v: torch.Tensor, bound: float) -> torch.Tensor:
    if bound == -math.inf:
        return torch.ones_like(v, dtype=torch.bool)
    return v >= bound


def _le(v: torch.Tensor, bound: float) -> torch.Tensor:
    if bound == math.inf:
        return torch.ones_like(v, dtype=torch.bool)
    return v <= bound


def _acc(t):
    """Half-precision inputs are computed in float32 (as the fused backends accumulate); others as they are.
    The cast is differentiable, so the gradient comes back in the input's dtype."""
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _setup(x, y, r, z, excl, kind):
    square = r is None
    dmat = signed_distance_matrix(_acc(x), _acc(r), kind)
    pos, neg = masks(y, z, excl, square)
    return dmat, pos, neg


def _masked_sum(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() (not multiplication) so that a NaN/inf term outside the mask cannot leak into the sum
    t = torch.where(mask, terms, torch.zeros_like(terms))
    return t.to(torch.float64).sum()


def contrastive_stats(x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high):
    """``[S+, C+, S-, C-]`` (float64) of the all-pairs contrastive loss.

    Positive pair (i, j in P(i)) selected iff ``d' > pos_lo``, term ``relu(d' - pos_margin)``; negative pair
    (j in Q(i)) selected iff ``d' < neg_hi``, term ``relu(neg_margin - d')``; a selected term counted iff
    ``low < t < high``. ``S`` = sum of counted terms (differentiable), ``C`` = their number.
    """
    dmat, pos, neg = _setup(x, y, r, z, excl, kind)
    tp = F.relu(dmat - pos_margin)
    tn = F.relu(neg_margin - dmat)
    cp = pos & _gt(dmat, pos_lo) & _gt(tp, low) & _lt(tp, high)
    cn = neg & _lt(dmat, neg_hi) & _gt(tn, low) & _lt(tn, high)
    sp = _masked_sum(tp, cp)
    sn = _masked_sum(tn, cn)
    f64 = dict(dtype=torch.float64, device=x.device)
    return torch.stack([sp, torch.tensor(float(cp.sum()), **f64), sn, torch.tensor(float(cn.sum()), **f64)])


def _triplet_blocks(n: int, m: int):
    """Chunks of anchor rows such that a (rows, M, M) triplet block stays small."""
    rows = max(1, _CHUNK_ELEMS // max(m * m, 1))
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def triplet_stats(x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high):
    """``[S, C]`` (float64) over all triplets (i, p in P(i), n in Q(i)).

    With ``t = d'_in - d'_ip`` the triplet is selected iff ``band_lo < t <= band_hi``; its term is
    ``relu(v)`` (``softplus(v)`` if ``smooth``) with ``v = d'_ip - d'_in + margin``, counted iff
    ``low < term < high``.
    """
    dmat, pos, neg = _setup(x, y, r, z, excl, kind)
    n, m = dmat.shape
    # start from an exact 0 attached to the graph (where(), not 0 * dmat: a NaN must not leak in)
    s_parts = [_masked_sum(dmat, torch.zeros_like(dmat, dtype=torch.bool))]
    count = 0
    for a, b in _triplet_blocks(n, m):
        dap = dmat[a:b, :, None]  # (rows, M_p, 1)
        dan = dmat[a:b, None, :]  # (rows, 1, M_n)
        valid = pos[a:b, :, None] & neg[a:b, None, :]
        t = dan - dap
        v = dap - dan + margin
        term = F.softplus(v) if smooth else F.relu(v)
        counted = valid & _gt(t, band_lo) & _le(t, band_hi) & _gt(term, low) & _lt(term, high)
        s_parts.append(_masked_sum(term, counted))
        count += int(counted.sum())
    s = torch.stack(s_parts).sum()
    return torch.stack([s, torch.tensor(float(count), dtype=torch.float64, device=x.device)])


def _first_index(values: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest j with ``mask[i, j]`` and ``values[i, j] == target[i]`` (NaN matches NaN); 0 if none."""
    hit = (values == target[:, None]) | (torch.isnan(values) & torch.isnan(target)[:, None])
    hit = hit & mask
    # argmax over an integer tensor returns the first maximal entry
    if hit.shape[1] == 0:
        return torch.zeros(hit.shape[0], dtype=torch.long, device=hit.device)
    return hit.to(torch.int8).argmax(dim=1)


def semihard_select_from_matrix(dmat, pos, neg):
    """The semi-hard choice on a given d' matrix: ``(a, p, n*)`` int64, one entry per positive pair (i, p) of an
    anchor with at least one negative (row-major order); ``n*`` = the negative with the smallest d'_in above
    d'_ip, else the negative with the largest d'_in (ties: lowest index)."""
    m = dmat.shape[1]
    with torch.no_grad():
        dd = dmat.detach()
        ai, pi = torch.nonzero(pos & neg.any(dim=1, keepdim=True), as_tuple=True)
        negm = neg[ai]  # (T, M)
        drow = dd[ai]  # (T, M)
        dap = dd[ai, pi]
        above = negm & (drow > dap[:, None])
        has_above = above.any(dim=1)
        inf = torch.tensor(math.inf, dtype=dd.dtype, device=dd.device)
        min_above = torch.where(above, drow, inf).amin(dim=1) if m > 0 else dap
        max_neg = torch.where(negm, drow, -inf).amax(dim=1) if m > 0 else dap
        idx_above = _first_index(drow, min_above, above)
        idx_max = _first_index(drow, max_neg, negm)
        nstar = torch.where(has_above, idx_above, idx_max)
    return ai, pi, nstar


def semihard_stats(x, y, r, z, excl, kind, margin):
    """``[S, C]`` (float64) of TF-Addons' semi-hard triplet loss.

    For every positive pair (i, p) of an anchor with at least one negative: ``n*`` = the negative with the
    smallest d'_in such that ``d'_in > d'_ip``; if none, the negative with the largest d'_in (ties: lowest
    index). ``S = sum relu(d'_ip - d'_in* + margin)``, ``C`` = number of such positive pairs.
    """
    dmat, pos, neg = _setup(x, y, r, z, excl, kind)
    ai, pi, nstar = semihard_select_from_matrix(dmat, pos, neg)
    v = dmat[ai, pi] - dmat[ai, nstar] + margin
    s = F.relu(v).to(torch.float64).sum()
    return torch.stack([s, torch.tensor(float(ai.numel()), dtype=torch.float64, device=x.device)])


def row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op):
    """Per anchor, the max or min d' over its positives (``side="pos"``) or negatives (``"neg"``).

    Candidates: ``lo <= d' <= hi`` and, when ``thr`` (N,) is given, ``d' > thr_i`` (``thr_op="gt"``) or
    ``d' < thr_i`` (``"lt"``), tested as PML does: an entry is dropped when it fails a test (``d' < lo``,
    ``d' > hi``, ``d' <= thr_i``, ``d' >= thr_i``), so a NaN d' stays a candidate and is picked (PML's
    ``torch.max``/``torch.min`` propagate NaN).

    Returns ``(value, index, found)``: value in x's accumulation dtype (float64 for float64 inputs, else
    float32), index int64 (ties: lowest index), found bool; value and index are 0 where nothing qualifies.
    No gradient.
    """
    if side not in ("pos", "neg"):
        raise ValueError(f"side must be 'pos' or 'neg', got {side!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if thr is not None and thr_op not in ("gt", "lt"):
        raise ValueError(f"thr_op must be 'gt' or 'lt' when thr is given, got {thr_op!r}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        dmat, pos, neg = _setup(x.detach(), y, None if r is None else r.detach(), z, excl, kind)
        return row_extreme_from_matrix(dmat.to(acc), pos, neg, side, mode, lo, hi, thr, thr_op)


def row_hardest(x, y, r, z, excl, kind):
    """Batch-hard mining: per anchor the max d' over its positives and the min d' over its negatives, i.e.
    ``row_extreme(..., "pos", "max") + row_extreme(..., "neg", "min")`` with no band or thresholds.

    Returns ``(pos_value, pos_index, pos_found, neg_value, neg_index, neg_found)`` (see :func:`row_extreme`).
    """
    inf = math.inf
    pos = row_extreme(x, y, r, z, excl, kind, "pos", "max", -inf, inf, None, "")
    neg = row_extreme(x, y, r, z, excl, kind, "neg", "min", -inf, inf, None, "")
    return pos + neg


def row_hardest_from_matrix(dmat, pos, neg):
    """:func:`row_hardest` on a given d' matrix and masks (value in the matrix's dtype)."""
    inf = math.inf
    p = row_extreme_from_matrix(dmat, pos, neg, "pos", "max", -inf, inf, None, "")
    n = row_extreme_from_matrix(dmat, pos, neg, "neg", "min", -inf, inf, None, "")
    return p + n


def row_extreme_from_matrix(dmat, pos, neg, side, mode, lo, hi, thr, thr_op):
    """:func:`row_extreme` on a given d' matrix and masks (value in the matrix's dtype)."""
    with torch.no_grad():
        dmat = dmat.detach()
        n, m = dmat.shape
        # PML masks what fails (d' < lo, d' > hi, d' <= thr for "gt", d' >= thr for "lt"): a NaN fails no test,
        # so it stays a candidate, and max/min then pick it (NaN propagates, at its lowest index)
        cand = (pos if side == "pos" else neg) & ~(dmat < lo) & ~(dmat > hi)
        if thr is not None:
            t = thr.to(dmat.dtype)[:, None]
            cand = cand & ~((dmat <= t) if thr_op == "gt" else (dmat >= t))
        found = cand.any(dim=1)
        if m == 0:
            zero = torch.zeros(n, dtype=dmat.dtype, device=dmat.device)
            return zero, torch.zeros(n, dtype=torch.long, device=dmat.device), found
        fill = -math.inf if mode == "max" else math.inf
        masked = torch.where(cand, dmat, torch.full_like(dmat, fill))
        value = masked.amax(dim=1) if mode == "max" else masked.amin(dim=1)
        index = _first_index(dmat, value, cand).to(torch.long)
        value = torch.where(found, value, torch.zeros_like(value))
        index = torch.where(found, index, torch.zeros_like(index))
    return value, index, found


def pair_values(x, r, i, j, kind):
    """d' of the given pairs ``(i[t], j[t])`` (``r=None``: ``r = x``), differentiable, exact near 0; float32 for
    half-precision inputs (as ``fastdml.ops.pair_values``)."""
    _check_kind(kind)
    if r is None:
        r = x
    a = _acc(x)[i]
    b = _acc(r)[j]
    if kind == "dot":
        return -(a * b).sum(-1)
    diff = a - b
    q = (diff * diff).sum(-1)
    d = q if kind == "sql2" else _safe_sqrt(q)
    bad_x, bad_r = _nanrule.extreme_rows(_acc(x)), _nanrule.extreme_rows(_acc(r))
    if bool(bad_x.any()) or bool(bad_r.any()):
        # as signed_distance_matrix: PML indexes its torch.cdist matrix, whose NaN/inf pattern it keeps
        with torch.no_grad():
            pml = torch.cdist(_acc(x), _acc(r))[i, j]
            pml = pml * pml if kind == "sql2" else pml
        d = torch.where(bad_x[i] | bad_r[j], _ValueOf.apply(d, pml), d)
    return d


def chosen_triplet_stats(x, valid, r, p, n, kind, margin, smooth, low, high):
    """``[S, C]`` (float64) of one chosen triplet per anchor: anchor i (row i of x), positive ``r[p_i]``,
    negative ``r[n_i]`` (``r=None``: ``r = x``); ``v_i = d'_{i p_i} - d'_{i n_i} + margin``, term ``relu(v_i)``
    (``softplus(v_i)`` if ``smooth``), counted iff ``valid_i`` and ``low < term_i < high``."""
    a = torch.arange(x.shape[0], device=x.device)
    dp = pair_values(x, r, a, p, kind)
    dn = pair_values(x, r, a, n, kind)
    v = dp - dn + margin
    term = F.softplus(v) if smooth else F.relu(v)
    counted = valid & _gt(term, low) & _lt(term, high)
    return torch.stack([_masked_sum(term, counted), counted.sum().to(torch.float64)])


def triplet_list(x, y, r, z, excl, kind, band_lo, band_hi):
    """All (a, p, n) int64 with p in P(a), n in Q(a) and ``band_lo < d'_an - d'_ap <= band_hi``,
    in PML's lexicographic (a, p, n) order."""
    with torch.no_grad():
        dmat, pos, neg = _setup(x.detach(), y, None if r is None else r.detach(), z, excl, kind)
        return triplet_list_from_matrix(dmat, pos, neg, band_lo, band_hi)


def triplet_list_from_matrix(dmat, pos, neg, band_lo, band_hi):
    """:func:`triplet_list` on a given d' matrix and masks."""
    with torch.no_grad():
        dmat = dmat.detach()
        n, m = dmat.shape
        outs_a, outs_p, outs_n = [], [], []
        for a, b in _triplet_blocks(n, m):
            dap = dmat[a:b, :, None]
            dan = dmat[a:b, None, :]
            t = dan - dap
            sel = pos[a:b, :, None] & neg[a:b, None, :] & _gt(t, band_lo) & _le(t, band_hi)
            ia, ip, ineg = torch.nonzero(sel, as_tuple=True)
            outs_a.append(ia + a)
            outs_p.append(ip)
            outs_n.append(ineg)
        if not outs_a:
            e = torch.zeros(0, dtype=torch.long, device=dmat.device)
            return e, e.clone(), e.clone()
        return torch.cat(outs_a), torch.cat(outs_p), torch.cat(outs_n)


def pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi):
    """``(a1, p, a2, n)`` int64: positive pairs with ``d' > pos_lo`` and negative pairs with ``d' < neg_hi``,
    each in row-major order (PML's ``torch.where`` order)."""
    with torch.no_grad():
        dmat, pos, neg = _setup(x.detach(), y, None if r is None else r.detach(), z, excl, kind)
        return pair_list_from_matrix(dmat, pos, neg, pos_lo, neg_hi)


def pair_list_from_matrix(dmat, pos, neg, pos_lo, neg_hi):
    """:func:`pair_list` on a given d' matrix and masks."""
    with torch.no_grad():
        dmat = dmat.detach()
        a1, p = torch.nonzero(pos & _gt(dmat, pos_lo), as_tuple=True)
        a2, n = torch.nonzero(neg & _lt(dmat, neg_hi), as_tuple=True)
    return a1, p, a2, n

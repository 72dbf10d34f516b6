"""The loss of one chosen triplet per anchor (batch-hard and easy/hard miners' picks), with its gradient
computed in the forward: ``chosen_triplet_stats_fwd``.

Anchor i (row i of x) has one positive ``p_i`` and one negative ``n_i`` (rows of r; r = x when None) and a
flag ``valid_i``. With ``v_i = d'(x_i, r_{p_i}) - d'(x_i, r_{n_i}) + margin`` the term is ``relu(v_i)``
(``softplus(v_i)`` if ``smooth``), counted iff ``valid_i`` and ``low < term_i < high``::

    S = sum_{counted i} term_i        C = #counted

and, with ``w_i = f'(v_i)`` for counted i (relu': ``[v_i > 0]``; softplus': ``sigmoid(v_i)``) and 0 otherwise,
``e_ip = x_i - r_{p_i}``, ``e_in = x_i - r_{n_i}``::

    l2:    dS/dx_i = c_ip e_ip - c_in e_in,  c = w / d  (0 where d = 0: the subgradient of |e| at 0)
    sql2:  the same with c = 2 w
    dot:   d' = -x.r,  dS/dx_i = w_i (r_{n_i} - r_{p_i})
    dS/dr_{p_i} -= (the anchor's positive part),   dS/dr_{n_i} += (its negative part)   (index_add_)

Cost O(N D): two row gathers, the differences, and the gradient reusing the differences' memory (so the
backward is one scaling, no second gather). The same few tensor ops serve every device; working memory is a
chunk of anchors within the memory budget. Where :func:`fastdml.dispatch.native_helpers` allows, the compiled
loop of ``fastdml.blocked.native`` computes the same sums in one pass over the anchors and one over the
chosen rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch
from ..config import memory_budget_bytes
from .rows import acc_dtype, add_rows

INF = math.inf


def _chunk_rows(n: int, d: int, esize: int) -> int:
    # per anchor: two gathered rows and one squared-difference row, plus a few scalars
    per_row = 3 * max(1, d) * esize + 64
    return max(1, min(n, memory_budget_bytes() // per_row))


def _dprime_and_coef(xa, rp, rn, kind):
    """d'_ap, d'_an, and the rows the gradient is built from (overwriting the gathered rows): for l2/sql2 the
    differences ``e = x_a - r``; for dot the gathered rows themselves."""
    if kind == "dot":
        return -(xa * rp).sum(1), -(xa * rn).sum(1)
    ep = torch.sub(xa, rp, out=rp)
    en = torch.sub(xa, rn, out=rn)
    if kind == "l2":
        # one fused reduction per side (the norm) instead of square, sum and sqrt
        return torch.linalg.vector_norm(ep, dim=1), torch.linalg.vector_norm(en, dim=1)
    return (ep * ep).sum(1), (en * en).sum(1)


def _inverse_or_zero(w, d):
    """``w / d`` where ``d > 0``, else 0: the subgradient of ``|e|`` at 0 (identical embeddings), never a
    division by zero. (``w / 0`` is inf or NaN and maps to 0; a finite quotient is kept.)"""
    return torch.div(w, d).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def chosen_triplet_stats_fwd(x, valid, r, p, n, kind, margin, smooth, low, high, need_grad, need_grad_r=True):
    """``(stats, gx_parts, gr_parts)``: ``stats = [S, C]`` float64, ``gx_parts (1, N, D)`` = dS/dx (``(0, N, D)``
    without ``need_grad``), ``gr_parts (1, M, D)`` = dS/dr (``(0, M, D)`` without ``need_grad_r``; ``(0, 0, D)``
    for r = None, whose gradient is in gx). See the module docstring."""
    with torch.no_grad():
        N, D = x.shape
        acc = acc_dtype(x.dtype)
        ref = x if r is None else r
        dev = x.device
        chunk = _chunk_rows(N, D, torch.finfo(acc).bits // 8)
        # one chunk (the usual case) writes every anchor row before any column part is added: no zero fill
        one_chunk = chunk >= N and ref.shape[0] > 0
        new = torch.empty if one_chunk else torch.zeros
        gx = new((1 if need_grad else 0, N, D), dtype=acc, device=dev)
        if r is None:
            gr_parts = x.new_empty((0, 0, D), dtype=acc)
            gcol = gx[0] if need_grad else None
        else:
            gr_parts = torch.zeros((1 if (need_grad and need_grad_r) else 0, r.shape[0], D), dtype=acc, device=dev)
            gcol = gr_parts[0] if gr_parts.shape[0] else None
        s_total = torch.zeros((), dtype=torch.float64, device=dev)
        c_total = torch.zeros((), dtype=torch.float64, device=dev)
        if ref.shape[0] == 0:
            # no reference rows (an empty memory): no anchor has a triplet, the indices point nowhere
            return torch.stack([s_total, c_total]), gx, gr_parts
        if x.dtype == acc and ref.dtype == acc and dispatch.native_helpers(dev, x.dtype):
            from ..blocked import native

            # both passes in C; None: a case for the ops below (a non-finite term, an index out of range)
            g = gx[0] if need_grad else None
            stats = native.chosen_triplets(x.contiguous(), ref.contiguous(), p.contiguous(), n.contiguous(),
                                           valid.contiguous(), kind, margin, smooth, low, high, g, gcol)  # fmt: skip
            if stats is not None:
                return stats, gx, gr_parts
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            xa = x[s:e].to(acc)
            pp, nn = p[s:e], n[s:e]
            # index_select: a row gather (memcpy per row), much faster on the CPU than advanced indexing
            rp = ref.index_select(0, pp).to(acc)
            rn = ref.index_select(0, nn).to(acc)
            dp, dn = _dprime_and_coef(xa, rp, rn, kind)
            v = (dp - dn).add_(margin)
            term = F.softplus(v) if smooth else F.relu(v)
            counted = valid[s:e].clone()
            if low != -INF:
                counted &= term > low
            if high != INF:
                counted &= term < high
            # where(), not a product: a term outside the mask (inf, NaN) must not leak into the sum
            s_total += torch.where(counted, term, 0.0).sum(dtype=torch.float64)
            c_total += counted.sum(dtype=torch.float64)
            if not need_grad:
                continue
            # w_i = f'(v_i) on the counted anchors, 0 elsewhere
            w = torch.where(counted, torch.sigmoid(v), 0.0) if smooth else (v > 0).logical_and_(counted).to(acc)
            ga = gx[0, s:e]
            if kind == "dot":
                # dS/dx_a = w (r_n - r_p);  dS/dr_p = -w x_a;  dS/dr_n = +w x_a
                diff = rn.sub_(rp)
                if one_chunk:
                    torch.mul(diff, w[:, None], out=ga)
                else:
                    ga.add_(diff.mul_(w[:, None]))
                if gcol is not None:
                    add_rows(gcol, pp, xa * (-w)[:, None])
                    add_rows(gcol, nn, xa * w[:, None])
                continue
            if kind == "l2":
                cp, cn = _inverse_or_zero(w, dp), _inverse_or_zero(w, dn)
            else:
                cp = cn = 2.0 * w
            # the rows' parts, in the gathered rows' memory (no longer needed): -c_p e_p for r_p, c_n e_n for r_n
            # (signs in the rows, not an index_add_ alpha: that costs a scaled copy);
            # the anchor's part is minus their sum
            gp = rp.mul_((-cp)[:, None])
            gn = rn.mul_(cn[:, None])
            if one_chunk:
                torch.add(gp, gn, out=ga).neg_()
            else:
                ga.sub_(gp).sub_(gn)
            if gcol is not None:
                add_rows(gcol, pp, gp)
                add_rows(gcol, nn, gn)
        return torch.stack([s_total, c_total]), gx, gr_parts

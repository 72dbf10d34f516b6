"""``d'`` of listed pairs and its gradient by direct differences: ``pair_values`` and its backward.

``d'_t = |x_{i_t} - r_{j_t}|`` (l2), its square (sql2) or ``-x_{i_t} . r_{j_t}`` (dot), over chunks of pairs
within the memory budget; the gradient is accumulated row by row with :func:`.rows.add_rows` (deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import memory_budget_bytes
from .rows import acc_dtype, add_rows


def _pair_chunk(n_pairs: int, dim: int) -> int:
    # a chunk holds a (chunk, D) difference in the accumulation dtype, plus indices: stay within the budget
    per_pair = max(1, dim) * 8 + 32
    return max(1, min(n_pairs, memory_budget_bytes() // (4 * per_pair)))


def pair_values(x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str) -> Tensor:
    """``d'(x[i_t], r[j_t])`` in the accumulation dtype (``r=None``: rows of ``x``)."""
    ref = x if r is None else r
    acc = acc_dtype(x.dtype)
    out = torch.empty(i.shape[0], dtype=acc, device=x.device)
    chunk = _pair_chunk(i.shape[0], x.shape[1])
    for s in range(0, i.shape[0], chunk):
        # index_select: a row gather (memcpy per row), much faster on the CPU than advanced indexing x[i]
        xi = x.index_select(0, i[s : s + chunk]).to(acc)
        rj = ref.index_select(0, j[s : s + chunk]).to(acc)
        if kind == "dot":
            out[s : s + chunk] = -(xi * rj).sum(1)
        else:
            q = (xi - rj).square().sum(1)
            out[s : s + chunk] = q.sqrt() if kind == "l2" else q
    return out


def pair_values_backward(
    grad: Tensor, values: Tensor, x: Tensor, r: Optional[Tensor], i: Tensor, j: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dr)`` for upstream ``grad`` of :func:`pair_values`; ``dL/dr`` is ``(0, D)`` for ``r=None``."""
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

"""The evaluation paths fastdml's losses share: given index tuples, lazy miner results (fused), chosen
triplets, the reducer windows' masked sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _context, ops
from .. import _validation as V
from .._common import INF, BandRecord, RowPairsRecord, window_value, zero_loss
from ..lazy import LazyIndices, TracedIndices


def _already_reduced(value):
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}


def _convert_to_triplets(idx):
    """PML's ``convert_to_triplets`` for a given tuple: pairs (a1, p, a2, n) become every (a, p, n) sharing
    the anchor."""
    if len(idx) == 3:
        return idx
    a1, p, a2, n = idx
    # (eager only: the shortcut is a branch on data, which a traced graph cannot take)
    eager = not torch.compiler.is_compiling()
    if eager and len(a1) == len(a2) and torch.equal(a1, a2) and bool((a1[1:] > a1[:-1]).all()):
        # one pair of each kind per anchor (BatchEasyHardMiner): the pairing is the identity, no (P, Q) mask
        return a1, p, n
    p_idx, n_idx = torch.where(a1.unsqueeze(1) == a2)
    return a1[p_idx], p[p_idx], n[n_idx]


def _convert_to_pairs(idx):
    """PML's ``convert_to_pairs``: a triplet (a, p, n) is the pairs (a, p) and (a, n)."""
    if len(idx) == 4:
        return idx
    a, p, n = idx
    return a, p, a, n


def _materialize_indices(indices_tuple, inp):
    if isinstance(indices_tuple, (LazyIndices, TracedIndices)):
        indices_tuple = indices_tuple.materialize()
    return V.check_indices_tuple(indices_tuple, inp.n, inp.m, inp.embeddings.device)


def _lazy_fuse(indices_tuple, inp, geo, op):
    """The :class:`~fastdml._common.BandRecord` of a lazy miner result usable for this call, else None."""
    if not isinstance(indices_tuple, (LazyIndices, TracedIndices)) or geo.spec is None:
        return None
    f = indices_tuple.fuse
    return f if isinstance(f, BandRecord) and f.usable(op, inp, geo) else None


def _row_pairs(indices_tuple, inp):
    """The :class:`~fastdml._common.RowPairsRecord` of a BatchHardMiner / BatchEasyHardMiner lazy result on a
    batch of this shape (the pairs are indices: any embeddings of the same shape may be evaluated on them, as
    PML does), else None."""
    if not isinstance(indices_tuple, (LazyIndices, TracedIndices)):
        return None
    f = indices_tuple.fuse
    return f if isinstance(f, RowPairsRecord) and (f.n, f.m) == (inp.n, inp.m) else None


def _masked_sum64(t, mask):
    """Sum of the masked entries in float64 (where(), not a product: a NaN outside the mask cannot leak in)."""
    return torch.where(mask, t, torch.zeros_like(t)).to(torch.float64).sum()


def _in_window(t, low, high):
    """``low < t < high``, an infinite bound imposing nothing (as the ops' windows)."""
    ok = torch.ones_like(t, dtype=torch.bool)
    if low != -INF:
        ok = ok & (t > low)
    if high != INF:
        ok = ok & (t < high)
    return ok


def _chosen_triplets(geo, valid, p, n, margin, smooth, win):
    """The windowed loss of one triplet (i, p_i, n_i) per anchor, the anchors without ``valid`` masked: term
    ``relu(d'_ip - d'_in + margin)`` (``softplus`` if ``smooth``), reduced to ``S / C`` (``S`` for Sum). Every
    anchor is evaluated, so no shape depends on the data (no host sync; torch.compile traces it whole)."""
    inp = geo.inp
    if geo.spec is not None:
        # one fused op: distances, terms and their gradient in one O(N D) pass
        st = ops.chosen_triplet_stats(geo.x, valid, geo.r, p, n, geo.kind, margin, smooth, win[0], win[1])
        return {"loss": _already_reduced(window_value(st[0], st[1], win, inp.embeddings))}
    if inp.m == 0:
        return {"loss": _already_reduced(zero_loss(inp.embeddings))}  # no references: no triplet
    a = torch.arange(inp.n, device=inp.embeddings.device)
    dap, dan = geo.dprime_two(a, p, a, n)
    v = dap - dan + margin
    term = F.softplus(v) if smooth else F.relu(v)
    counted = valid & _in_window(term, win[0], win[1])
    s_, c_ = _context.reduce_sum_count(_masked_sum64(term, counted), counted.sum().to(torch.float64))
    return {"loss": _already_reduced(window_value(s_, c_, win, inp.embeddings))}


def _r_for(geo, square):
    """The ops' reference argument for a (square or rectangular) structure."""
    if square:
        return None
    if geo.r is not None:
        return geo.r
    return geo.x  # the loss's own call is square, the miner's was rectangular on the same tensor

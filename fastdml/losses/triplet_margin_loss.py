"""PML's ``TripletMarginLoss``, fused, and PML's random triplet sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import _validation as V
from .. import ops
from .._common import INF, Geometry, window_value
from ..reducers import AvgNonZeroReducer
from ._paths import (
    _already_reduced,
    _chosen_triplets,
    _convert_to_triplets,
    _lazy_fuse,
    _materialize_indices,
    _r_for,
    _row_pairs,
)
from .base_metric_loss_function import BaseMetricLossFunction


def random_triplets(inp, t_per_anchor):
    """PML's ``get_random_triplet_indices`` distribution: per label (sorted), each anchor of that label gets
    ``t_per_anchor`` positives drawn uniformly (with replacement; the anchor itself excluded when the diagonal
    is) and as many negatives drawn uniformly. Classes without a usable positive or any negative are skipped.
    Draws use torch's default generator in PML's order."""
    y = inp.y
    z = y if inp.square else inp.z
    dev = inp.embeddings.device
    a_out, p_out, n_out = [], [], []
    for label in torch.unique(y):
        p_inds = torch.where(z == label)[0]
        a_inds = p_inds if inp.diag else torch.where(y == label)[0]
        n_inds = torch.where(z != label)[0]
        n_a, n_p = len(a_inds), len(p_inds)
        if n_p < (2 if inp.diag else 1) or len(n_inds) < 1:
            continue
        k = t_per_anchor
        num = n_a * k
        p_choices = p_inds.expand((n_a, n_p))
        if inp.diag:
            p_choices = p_choices[~torch.eye(n_a, dtype=torch.bool, device=p_inds.device)].view((n_a, n_a - 1))
        p_ = torch.randint(0, p_choices.shape[1], (num,))
        a_ = torch.arange(n_a).view(-1, 1).repeat(1, k).view(num)
        p = p_choices[a_.to(p_choices.device), p_.to(p_choices.device)]
        a = a_inds[a_.to(a_inds.device)]
        n_ = torch.randint(0, len(n_inds), (num,))
        n = n_inds[n_.to(n_inds.device)]
        a_out.append(a)
        p_out.append(p)
        n_out.append(n)
    if not a_out:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e.clone(), e.clone()
    return tuple(torch.cat(t).to(device=dev, dtype=torch.long) for t in (a_out, p_out, n_out))


class TripletMarginLoss(BaseMetricLossFunction):
    """PML's ``TripletMarginLoss``: per triplet ``relu(d_ap - d_an + margin)`` (``softplus`` with
    ``smooth_loss``; for similarities ``s_an - s_ap + margin``), AvgNonZero by default.

    Without ``indices_tuple`` and ``triplets_per_anchor="all"``: all triplets, fused (``ops.triplet_stats``),
    nothing listed. ``swap=True`` (the anchor-negative distance replaced by the smaller of it and the
    positive-negative distance, ``mat[p, n]`` as PML) lists the triplets and takes the given-indices path.

    An integer ``triplets_per_anchor`` samples triplets at random as PML does: the same **distribution** (per
    anchor, that many uniform positives and uniform negatives); the numbers drawn are not guaranteed to be
    PML's.
    """

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", **kwargs):
        self.margin = V.check_number(margin, "margin")
        self.swap = bool(swap)
        self.smooth_loss = bool(smooth_loss)
        if triplets_per_anchor != "all":
            ok = isinstance(triplets_per_anchor, int) and not isinstance(triplets_per_anchor, bool)
            if not ok or triplets_per_anchor < 1:
                raise ValueError(f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}")
        self.triplets_per_anchor = triplets_per_anchor
        super().__init__(**kwargs)

    def get_default_reducer(self):
        """PML's hook: the reducer used when none is given."""
        return AvgNonZeroReducer()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook (its general algorithm: the distance matrix, indexed): the per-triplet loss dict."""
        inp = self._resolve(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        geo = Geometry(self.distance, inp, generic=True)
        if indices_tuple is not None:
            return self._given(geo, _convert_to_triplets(_materialize_indices(indices_tuple, inp)))
        if self.triplets_per_anchor != "all":
            return self._given(geo, random_triplets(inp, self.triplets_per_anchor))
        return self._given(geo, geo.triplet_list())

    def _compute(self, inp, indices_tuple):
        geo = Geometry(self.distance, inp)
        win = self.window("loss")
        fusable = geo.spec is not None and win is not None and not self.swap
        if indices_tuple is None:
            if self.triplets_per_anchor != "all":
                return self._given(geo, random_triplets(inp, self.triplets_per_anchor))
            if fusable:
                return self._fused(geo, inp.square, inp.y, inp.z, inp.excl, -INF, INF, win)
            return self._given(geo, geo.triplet_list())
        f = _lazy_fuse(indices_tuple, inp, geo, "triplet_band") if fusable else None
        if f is not None:
            return self._fused(geo, f.square, f.y, f.z, f.excl, f.band[0], f.band[1], win)
        rp = _row_pairs(indices_tuple, inp) if (win is not None and not self.swap) else None
        if rp is not None:
            # one triplet (a, p_a, n_a) per valid anchor, evaluated over all anchors with the others masked
            return _chosen_triplets(geo, rp.valid, rp.p, rp.neg, self.margin, self.smooth_loss, win)
        return self._given(geo, _convert_to_triplets(_materialize_indices(indices_tuple, inp)))

    def _fused(self, geo, square, y, z, excl, band_lo, band_hi, win):
        st = ops.triplet_stats(
            geo.x,
            y,
            _r_for(geo, square),
            z,
            excl,
            geo.kind,
            self.margin,
            self.smooth_loss,
            band_lo,
            band_hi,
            win[0],
            win[1],
        )
        self._fused_stats(geo, square, y, z, excl, band_lo, band_hi, st)
        return {"loss": _already_reduced(window_value(st[0], st[1], win, geo.inp.embeddings))}

    def _fused_stats(self, geo, square, y, z, excl, band_lo, band_hi, st):
        pass

    def _terms(self, geo, a, p, n):
        ap, an = geo.raw_two(a, p, a, n)
        if self.swap:
            pn = geo.raw(p, n)
            an = self.distance.smallest_dist(an, pn)
        violation = self.distance.margin(ap, an) + self.margin
        return F.softplus(violation) if self.smooth_loss else F.relu(violation)

    def _given(self, geo, idx):
        a, p, n = idx
        # (guard_or_false: a traced tuple's size may be data; the reducers then give 0 for no terms)
        if guard_or_false(len(a) == 0):
            return self.zero_losses()
        loss = self._terms(geo, a, p, n)
        return {"loss": {"losses": loss, "indices": (a, p, n), "reduction_type": "triplet"}}

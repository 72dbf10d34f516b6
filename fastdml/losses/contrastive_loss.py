"""PML's ``ContrastiveLoss``, fused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .. import _context, ops
from .. import _validation as V
from .._common import INF, Geometry, window_value, zero_loss
from ..reducers import AvgNonZeroReducer
from ._paths import (
    _already_reduced,
    _convert_to_pairs,
    _in_window,
    _lazy_fuse,
    _masked_sum64,
    _materialize_indices,
    _r_for,
    _row_pairs,
)
from .generic_pair_loss import GenericPairLoss


class ContrastiveLoss(GenericPairLoss):
    """PML's ``ContrastiveLoss``: positive pairs ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``
    (unsquared hinges; for a similarity s: ``relu(pos_margin - s)`` and ``relu(s - neg_margin)``), the positive
    and the negative terms reduced separately (AvgNonZero by default) and added.

    Without ``indices_tuple``: all pairs (the diagonal excluded), fused (``ops.contrastive_stats``). PML's
    quirk is kept: when every index list has at most one pair, the loss is zero.

    PML's hooks (``compute_loss``, ``_compute_loss``, ``get_per_pair_loss``, ``pos_calc``, ``neg_calc``) are
    PML's general algorithm: calling them directly gives PML's loss dict, and a subclass overriding one of them
    takes that path instead of the fused one.
    """

    _fused_hooks = (
        "compute_loss",
        "_compute_loss",
        "get_per_pair_loss",
        "pos_calc",
        "neg_calc",
        "pair_based_loss",
        "mat_based_loss",
    )

    def __init__(self, pos_margin=0, neg_margin=1, **kwargs):
        self.pos_margin = V.check_number(pos_margin, "pos_margin")
        self.neg_margin = V.check_number(neg_margin, "neg_margin")
        super().__init__(mat_based_loss=False, **kwargs)

    def get_default_reducer(self):
        """PML's hook: the reducer used when none is given."""
        return AvgNonZeroReducer()

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    # ---- PML's hooks (the general path) ----
    def _compute_loss(self, pos_pair_dist, neg_pair_dist, indices_tuple):
        pos_loss = self.get_per_pair_loss(pos_pair_dist, "pos") if len(pos_pair_dist) > 0 else 0
        neg_loss = self.get_per_pair_loss(neg_pair_dist, "neg") if len(neg_pair_dist) > 0 else 0
        return {
            "pos_loss": {"losses": pos_loss, "indices": tuple(indices_tuple[:2]), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": tuple(indices_tuple[2:]), "reduction_type": "neg_pair"},
        }

    def get_per_pair_loss(self, pair_dists, pos_or_neg):
        """PML's hook: the terms of the positive (``pos_calc``) or negative (``neg_calc``) pairs."""
        calc = self.pos_calc if pos_or_neg == "pos" else self.neg_calc
        return calc(pair_dists, self.pos_margin if pos_or_neg == "pos" else self.neg_margin)

    def pos_calc(self, pos_pair_dist, margin):
        """PML's hook: ``relu(d - m_pos)`` of a positive pair (sign flipped for a similarity)."""
        return F.relu(self.distance.margin(pos_pair_dist, margin))

    def neg_calc(self, neg_pair_dist, margin):
        """PML's hook: ``relu(m_neg - d)`` of a negative pair (sign flipped for a similarity)."""
        return F.relu(self.distance.margin(margin, neg_pair_dist))

    # ---- fused ----
    def _compute(self, inp, indices_tuple):
        geo = Geometry(self.distance, inp)
        wp, wn = self.window("pos_loss"), self.window("neg_loss")
        fusable = geo.spec is not None and wp is not None and wn is not None
        if indices_tuple is None:
            if fusable:
                return self._fused(geo, inp.square, inp.y, inp.z, inp.excl, -INF, INF, wp, wn)
            return self._given(geo, geo.pair_list())
        f = _lazy_fuse(indices_tuple, inp, geo, "pair_band") if fusable else None
        if f is not None:
            return self._fused(geo, f.square, f.y, f.z, f.excl, f.band[0], f.band[1], wp, wn)
        rp = _row_pairs(indices_tuple, inp) if (wp is not None and wn is not None) else None
        if rp is not None:
            return self._row_pairs_fused(geo, rp, wp, wn)
        return self._given(geo, _convert_to_pairs(_materialize_indices(indices_tuple, inp)))

    def _row_pairs_fused(self, geo, rp, wp, wn):
        """One positive (a, p_a) and one negative (a, n_a) pair per valid anchor, evaluated over all anchors with
        the invalid ones masked (no listing, no data-dependent shape)."""
        emb = geo.inp.embeddings
        a = torch.arange(rp.n, device=emb.device)
        valid = rp.valid
        tp = F.relu(self.distance.margin(geo.raw(a, rp.p), self.pos_margin))
        tn = F.relu(self.distance.margin(self.neg_margin, geo.raw(a, rp.neg)))
        cp = valid & _in_window(tp, wp[0], wp[1])
        cn = valid & _in_window(tn, wn[0], wn[1])
        # (sums and counts added over the ranks inside a distributed wrapper's context)
        sp, cp_ = _context.reduce_sum_count(_masked_sum64(tp, cp), cp.sum().to(torch.float64))
        sn, cn_ = _context.reduce_sum_count(_masked_sum64(tn, cn), cn.sum().to(torch.float64))
        vp = window_value(sp, cp_, wp, emb)
        vn = window_value(sn, cn_, wn, emb)
        out = {"pos_loss": _already_reduced(vp), "neg_loss": _already_reduced(vn)}
        # every index list has at most one pair iff at most one anchor is valid
        return self._pml_zero_rule(valid.sum() <= 1, out, emb)

    def _dprime_margins(self, geo):
        # PML: relu(pos_margin - s), relu(s - neg_margin) for similarities; with s = -d' these are
        # relu(d' - (-pos_margin)) and relu((-neg_margin) - d')
        if geo.kind == "dot":
            return -self.pos_margin, -self.neg_margin
        return self.pos_margin, self.neg_margin

    def _fused(self, geo, square, y, z, excl, pos_lo, neg_hi, wp, wn):
        pm, nm = self._dprime_margins(geo)
        r = _r_for(geo, square)
        x = geo.x
        emb = geo.inp.embeddings

        def stats(low, high):
            return ops.contrastive_stats(x, y, r, z, excl, geo.kind, pm, nm, pos_lo, neg_hi, low, high)

        if wp[:2] == wn[:2]:
            st = stats(wp[0], wp[1])
            sp, cp, sn, cn = st[0], st[1], st[2], st[3]
        else:
            a, b = stats(wp[0], wp[1]), stats(wn[0], wn[1])
            sp, cp, sn, cn = a[0], a[1], b[2], b[3]
        vp, vn = window_value(sp, cp, wp, emb), window_value(sn, cn, wn, emb)
        out = {"pos_loss": _already_reduced(vp), "neg_loss": _already_reduced(vn)}
        zero = self._fused_zero(x, y, r, z, excl, geo.kind, pm, nm, square, pos_lo, neg_hi, wp, wn, cp, cn)
        return self._pml_zero_rule(zero, out, emb)

    def _pml_zero_rule(self, zero, out, embeddings):
        """PML's quirk, applied here only: the loss is PML's zero loss when every index list holds at most one
        pair. ``zero``: None or False (it does not apply), True (decided eagerly: PML's zero losses), or a bool
        tensor (decided without a host sync: every term is replaced by the zero loss where it holds)."""
        if zero is None or zero is False:
            return out
        if zero is True:
            return self.zero_losses()
        z0 = zero_loss(embeddings)
        for info in out.values():
            t = info["losses"]
            info["losses"] = torch.where(zero, z0.to(t.dtype), t)
        return out

    def _fused_zero(self, x, y, r, z, excl, kind, pm, nm, square, pos_lo, neg_hi, wp, wn, cp, cn):
        """Whether PML's zero rule holds for a fused call (see :meth:`_pml_zero_rule`), from the cheapest source
        of the *selected* pair counts; without a host sync wherever the loss must compile with fullgraph."""
        if pos_lo == -INF and neg_hi == INF:
            if square:
                return None  # square, no band: pairs come in symmetric couples, so "at most one" means none
            # rectangular, no band: every pair is selected; N (M - 1) >= 3 pairs can never be at most one of
            # each kind (decided from the shapes), unless every rank must make the same collective call
            # (guard_or_true: a size only known when the graph runs, e.g. a memory's masked queries, counts)
            if _context.reducing() or guard_or_true(x.shape[0] * (r.shape[0] - 1) < 3):
                return self._at_most_one_pair(*self._all_pair_counts(x, y, r, z, excl))
            return None
        if (wp[0], wp[1], wn[0], wn[1]) == (-INF, INF, -INF, INF):
            return self._at_most_one_pair(cp, cn)  # no reducer window: the counted pairs are the selected ones
        if torch.compiler.is_compiling():
            # a band and a window: the band's selected counts need their own (gradient-free) sweep
            return self._at_most_one_pair(*self._band_counts(x, y, r, z, excl, kind, pm, nm, pos_lo, neg_hi))
        # eagerly that sweep is only needed when at most one pair of each kind was counted
        if float(cp.detach()) > 1 or float(cn.detach()) > 1:
            return None
        sel_p, sel_n = self._band_counts(x, y, r, z, excl, kind, pm, nm, pos_lo, neg_hi)
        return float(sel_p) <= 1 and float(sel_n) <= 1

    @staticmethod
    def _at_most_one_pair(sel_p, sel_n):
        """PML's zero-loss rule on the (global) selected pair counts, as a bool tensor (no host sync)."""
        return (sel_p <= 1) & (sel_n <= 1)

    @staticmethod
    def _all_pair_counts(x, y, r, z, excl):
        """Numbers of positive and negative pairs of the rectangular all-pairs structure, float64 0-dim tensors,
        added over the ranks inside a distributed pool context (as the stats' counts are). With
        ``E = sum_i #{j : z_j == y_i}``::

            P = E - #{i : excl_i >= 0, z_(excl_i) == y_i},    Q = N M - E - #{i : excl_i >= 0, z_(excl_i) != y_i}

        (the excluded pair of query i is in neither). O((N + M) log M): one sort of the labels, static shapes
        (compile-friendly)."""
        excl = _context.resolve_excl(x, r, excl, count=False)
        zs = torch.sort(z).values
        same = (torch.searchsorted(zs, y, right=True) - torch.searchsorted(zs, y, right=False)).sum()
        n_pairs = y.shape[0] * z.shape[0]
        if excl is None or z.shape[0] == 0:
            ex_p = ex_n = same.new_zeros(())
        else:
            has = excl >= 0
            eq = z[excl.clamp_min(0)] == y
            ex_p = (has & eq).sum()
            ex_n = (has & ~eq).sum()
        sel_p = (same - ex_p).to(torch.float64)
        sel_n = (n_pairs - same - ex_n).to(torch.float64)
        return _context.reduce_sum_count(sel_p, sel_n)

    @staticmethod
    def _band_counts(x, y, r, z, excl, kind, pm, nm, pos_lo, neg_hi):
        """Selected positive and negative pair counts of a band (no reducer window), one gradient-free sweep."""
        with torch.no_grad():
            full = ops.contrastive_stats(
                x.detach(), y, None if r is None else r.detach(), z, excl, kind, pm, nm, pos_lo, neg_hi, -INF, INF
            )
        return full[1], full[3]

    def _given(self, geo, idx):
        a1, p, a2, n = idx
        if torch.compiler.is_compiling():
            # a traced tuple's sizes may be data: the rule is a tensor, and the terms are computed unconditionally
            zero = (torch.ones_like(a1).sum() <= 1) & (torch.ones_like(a2).sum() <= 1)
        else:
            zero = all(len(t) <= 1 for t in idx)
            if zero:
                return self._pml_zero_rule(True, None, geo.inp.embeddings)
        pos_loss = neg_loss = 0
        if zero is not False or len(a1) > 0:
            pos_loss = F.relu(self.distance.margin(geo.raw(a1, p), self.pos_margin))
        if zero is not False or len(a2) > 0:
            neg_loss = F.relu(self.distance.margin(self.neg_margin, geo.raw(a2, n)))
        out = {
            "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
        }
        return self._pml_zero_rule(zero, out, geo.inp.embeddings)

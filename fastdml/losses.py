"""Losses, drop-in for ``pytorch_metric_learning.losses`` (same names, arguments, defaults and numbers).

Every loss is called as PML's: ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)``, and takes PML's ``distance``, ``reducer``, ``embedding_regularizer``,
``embedding_reg_weight`` and ``collect_stats`` (fastdml's or PML's distance / reducer objects alike).

How a call is computed (fastest first):

1. **Fused** (no N x M matrix, no index list): no ``indices_tuple`` (or the lazy result of a fastdml miner run
   on the same embeddings tensor), a distance with a fused spec (``LpDistance(p=2, power=1|2)``,
   ``CosineSimilarity``, ``DotProductSimilarity``: :func:`fastdml.distances.fused_spec`) and a windowed reducer
   (Mean, Sum, AvgNonZero, Threshold: :func:`fastdml.reducers.reducer_window`). One ``fastdml.ops`` sweep
   returns the sum and count of the counted terms; the loss is ``S / C`` (``S`` for Sum), zero when ``C = 0``.
   BatchHardMiner / BatchEasyHardMiner results are N chosen pairs, evaluated with ``ops.pair_values`` and
   masked (as is :class:`BatchHardTripletLoss`), with no data-dependent shape.
2. **Given indices**: the distances of the listed pairs only, by ``ops.pair_values`` (O(T D), exact), then
   PML's formula per element and the reducer object itself (any reducer).
3. **Generic**: a distance without fused spec (``p != 2``, other powers, subclasses): the distance object's
   own matrix, indexed exactly as PML does.

``swap=True``, an integer ``triplets_per_anchor``, ``DoNothingReducer`` and custom reducers list the
triplets/pairs (through ``ops.triplet_list`` / ``ops.pair_list``) and take path 2 (slower, same numbers).

PML semantics kept: labels are moved to the embeddings' device; ``labels=None`` is accepted with an
``indices_tuple``; the diagonal is excluded iff ``ref_labels is labels`` (``ref_emb=None``, or the caller passing
the same labels object); nothing to compute gives ``(embeddings * 0).sum()``; similarities flip the margins.

Also here: :class:`PairedContrastiveLoss` (the write-up's loss on given pairs) and the one-pass batch losses
PML reaches only through miner + loss: :class:`BatchHardTripletLoss`, :class:`BatchAllTripletLoss`,
:class:`SemiHardTripletLoss`.

Names fastdml does not implement (``NTXentLoss``, ``SupConLoss``, ``ArcFaceLoss``, ``MultipleLosses``, ...)
are PML's own classes when PML is installed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

from . import _context, ops, reference
from . import _validation as V
from ._common import INF, Geometry, _normalize, resolve_inputs, window_value, zero_loss
from .distances import LpDistance
from .lazy import LazyIndices, TracedIndices
from .reducers import (
    AvgNonZeroReducer,
    MeanReducer,
    MultipleReducers,
    is_do_nothing,
    is_multiple,
    reducer_window,
)

__all__ = [
    "BaseMetricLossFunction",
    "ContrastiveLoss",
    "TripletMarginLoss",
    "PairedContrastiveLoss",
    "BatchHardTripletLoss",
    "BatchAllTripletLoss",
    "SemiHardTripletLoss",
]


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
    """The fuse record of a lazy miner result usable for this call, else None: mined by a fastdml miner on the
    very same embeddings / ref_emb tensors (identity, unmodified since) with the same fused distance spec."""
    if not isinstance(indices_tuple, (LazyIndices, TracedIndices)) or geo.spec is None:
        return None
    f = indices_tuple.fuse
    if not f or f.get("op") != op:
        return None
    if f["x"] is not inp.embeddings or f["ref"] is not inp.ref_emb:
        return None
    # (eager only: a traced graph cannot branch on version counters; within one graph the tensors are the
    # ones the miner saw)
    if not torch.compiler.is_compiling() and f["versions"] != (inp.embeddings._version, inp.ref_emb._version):
        return None
    if f["spec"] != geo.spec:
        return None
    return f


def _row_pairs(indices_tuple, inp):
    """The (valid, p, n) arrays of a BatchHardMiner / BatchEasyHardMiner lazy result on a batch of this shape
    (the pairs are indices: any embeddings of the same shape may be evaluated on them, as PML does), else None."""
    if not isinstance(indices_tuple, (LazyIndices, TracedIndices)):
        return None
    f = indices_tuple.fuse
    if not f or f.get("op") != "row_pairs" or f["n"] != inp.n or f["m"] != inp.m:
        return None
    return f


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


class BaseMetricLossFunction(torch.nn.Module):
    """PML's ``BaseMetricLossFunction``: distance, reducer, embedding regularizer, collect_stats, and the call
    ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

    _stat_names: tuple = ()
    _indices_supported = True

    def __init__(
        self,
        distance=None,
        reducer=None,
        embedding_regularizer=None,
        embedding_reg_weight=1,
        collect_stats=None,
    ):
        super().__init__()
        self.collect_stats = bool(collect_stats) if collect_stats is not None else False
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.distance = self.get_default_distance() if distance is None else distance
        self.set_reducer(reducer)
        self.reset_stats()

    # ---- PML plumbing ----
    def get_default_distance(self):
        return LpDistance(p=2)

    def get_default_reducer(self):
        return MeanReducer()

    def _sub_loss_names(self):
        return ["loss"]

    def sub_loss_names(self):
        extra = ["embedding_reg_loss"] if self.embedding_regularizer is not None else []
        return self._sub_loss_names() + extra

    def set_reducer(self, reducer):
        """As PML: a MultipleReducers or DoNothingReducer is kept; otherwise one (deep-copied) reducer per
        sub-loss, wrapped in MultipleReducers when there are several."""
        if is_multiple(reducer) or is_do_nothing(reducer):
            self.reducer = reducer
            return
        names = self.sub_loss_names()
        make = (lambda: self.get_default_reducer()) if reducer is None else (lambda: copy.deepcopy(reducer))
        if len(names) == 1:
            self.reducer = make()
        else:
            self.reducer = MultipleReducers({k: make() for k in names})

    def sub_reducer(self, name):
        if is_multiple(self.reducer):
            r = self.reducer
            return r.reducers[name] if name in r.reducers else r.default_reducer
        return self.reducer

    def window(self, name):
        """The fused window of sub-loss ``name``'s reducer, or None (per-element path)."""
        if is_do_nothing(self.reducer):
            return None
        return reducer_window(self.sub_reducer(name))

    def zero_losses(self):
        return {k: _already_reduced(0) for k in self._sub_loss_names()}

    def reset_stats(self):
        if self.collect_stats:
            for k in self._stat_names:
                setattr(self, k, 0)

    # ---- the call ----
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss (a 0-dim tensor), or the loss dict with a DoNothingReducer."""
        self.reset_stats()
        if indices_tuple is not None and not self._indices_supported:
            raise ValueError(f"indices_tuple is not supported by {type(self).__name__}: it selects its own triplets")
        if labels is None and indices_tuple is None:
            V.check_embeddings(embeddings, "embeddings")
            raise ValueError("labels and indices_tuple cannot both be None")
        inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels, labels_required=indices_tuple is None)
        loss_dict = self.compute_loss(inp, indices_tuple)
        if self.embedding_regularizer is not None:
            reg = self.embedding_regularizer(embeddings) * self.embedding_reg_weight
            loss_dict["embedding_reg_loss"] = _already_reduced(reg)
        out = self.reducer(loss_dict, embeddings, inp.labels)
        if torch.is_tensor(out) and out.dtype != embeddings.dtype:
            # half-precision embeddings: computed in float32, rounded once here (PML returns their dtype)
            out = out.to(embeddings.dtype)
        return out

    def compute_loss(self, inp, indices_tuple):
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------
# contrastive
# ------------------------------------------------------------------------------------------------------------
class ContrastiveLoss(BaseMetricLossFunction):
    """PML's ``ContrastiveLoss``: positive pairs ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``
    (unsquared hinges; for a similarity s: ``relu(pos_margin - s)`` and ``relu(s - neg_margin)``), the positive
    and the negative terms reduced separately (AvgNonZero by default) and added.

    Without ``indices_tuple``: all pairs (the diagonal excluded), fused (``ops.contrastive_stats``). PML's
    quirk is kept: when every index list has at most one pair, the loss is zero.
    """

    def __init__(self, pos_margin=0, neg_margin=1, **kwargs):
        self.pos_margin = V.check_number(pos_margin, "pos_margin")
        self.neg_margin = V.check_number(neg_margin, "neg_margin")
        super().__init__(**kwargs)

    def get_default_reducer(self):
        return AvgNonZeroReducer()

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    def compute_loss(self, inp, indices_tuple):
        geo = Geometry(self.distance, inp)
        wp, wn = self.window("pos_loss"), self.window("neg_loss")
        fusable = geo.spec is not None and wp is not None and wn is not None
        if indices_tuple is None:
            if fusable:
                return self._fused(geo, inp.square, inp.y, inp.z, inp.excl, -INF, INF, wp, wn)
            return self._given(geo, geo.pair_list())
        f = _lazy_fuse(indices_tuple, inp, geo, "pair_band") if fusable else None
        if f is not None:
            return self._fused(geo, f["square"], f["y"], f["z"], f["excl"], f["band"][0], f["band"][1], wp, wn)
        rp = _row_pairs(indices_tuple, inp) if (wp is not None and wn is not None) else None
        if rp is not None:
            return self._row_pairs_fused(geo, rp, wp, wn)
        return self._given(geo, _convert_to_pairs(_materialize_indices(indices_tuple, inp)))

    def _row_pairs_fused(self, geo, rp, wp, wn):
        """One positive (a, p_a) and one negative (a, n_a) pair per valid anchor, evaluated over all anchors with
        the invalid ones masked (no listing, no data-dependent shape)."""
        emb = geo.inp.embeddings
        a = torch.arange(rp["n"], device=emb.device)
        valid = rp["valid"]
        tp = F.relu(self.distance.margin(geo.raw(a, rp["p"]), self.pos_margin))
        tn = F.relu(self.distance.margin(self.neg_margin, geo.raw(a, rp["neg"])))
        cp = valid & _in_window(tp, wp[0], wp[1])
        cn = valid & _in_window(tn, wn[0], wn[1])
        # (sums and counts added over the ranks inside a distributed wrapper's context)
        sp, cp_ = _context.reduce_sum_count(_masked_sum64(tp, cp), cp.sum().to(torch.float64))
        sn, cn_ = _context.reduce_sum_count(_masked_sum64(tn, cn), cn.sum().to(torch.float64))
        vp = window_value(sp, cp_, wp, emb)
        vn = window_value(sn, cn_, wn, emb)
        # PML: zero when every index list has at most one pair, i.e. at most one valid anchor
        several = valid.sum() > 1
        vp = torch.where(several, vp, torch.zeros_like(vp))
        vn = torch.where(several, vn, torch.zeros_like(vn))
        return {"pos_loss": _already_reduced(vp), "neg_loss": _already_reduced(vn)}

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
        # PML returns zero when every index list has at most one pair (at most one selected positive pair and
        # at most one selected negative pair). [issue 7] Decided without a host sync wherever the selected
        # counts are known without data-dependent control flow, so the loss compiles with fullgraph=True:
        unbounded = (wp[0], wp[1], wn[0], wn[1]) == (-INF, INF, -INF, INF)
        if square and pos_lo == -INF and neg_hi == INF:
            # square, no band: pairs come in symmetric couples, so "at most one" means none: nothing to check
            zero = None
        elif pos_lo == -INF and neg_hi == INF:
            # rectangular, no band: every pair is selected. With N (M - 1) >= 3 (at most one excluded pair per
            # query) there are at least 3 pairs: never zero, decided from the shapes. Otherwise, or when every
            # rank must make the same collective call, the counts follow from the labels alone.
            # (guard_or_true: a size only known when the graph runs, e.g. a memory's masked queries, counts)
            if _context.reducing() or guard_or_true(x.shape[0] * (r.shape[0] - 1) < 3):
                zero = self._at_most_one_pair(*self._all_pair_counts(x, y, r, z, excl))
            else:
                zero = None
        elif unbounded:
            # no reducer window: the counted pairs are the selected ones
            zero = self._at_most_one_pair(cp, cn)
        elif torch.compiler.is_compiling():
            # a band and a window: the band's selected counts need their own (gradient-free) sweep
            zero = self._at_most_one_pair(*self._band_counts(x, y, r, z, excl, geo.kind, pm, nm, pos_lo, neg_hi))
        else:
            # eagerly the extra sweep is only needed when at most one pair of each kind was counted
            zero = None
            if float(cp.detach()) <= 1 and float(cn.detach()) <= 1:
                sel_p, sel_n = self._band_counts(x, y, r, z, excl, geo.kind, pm, nm, pos_lo, neg_hi)
                if float(sel_p) <= 1 and float(sel_n) <= 1:
                    return self.zero_losses()
        if zero is not None:
            # both branches computed, the zero chosen by torch.where: the value and gradient of PML's zero loss
            z0 = zero_loss(emb).to(vp.dtype)
            vp = torch.where(zero, z0, vp)
            vn = torch.where(zero, z0, vn)
        return {"pos_loss": _already_reduced(vp), "neg_loss": _already_reduced(vn)}

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
            return self._given_traced(geo, idx)
        if all(len(t) <= 1 for t in idx):
            return self.zero_losses()
        pos_loss = neg_loss = 0
        if len(a1) > 0:
            pos_loss = F.relu(self.distance.margin(geo.raw(a1, p), self.pos_margin))
        if len(a2) > 0:
            neg_loss = F.relu(self.distance.margin(self.neg_margin, geo.raw(a2, n)))
        return {
            "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
        }

    def _given_traced(self, geo, idx):
        """:meth:`_given` without branches on the tuple's sizes (which may be data when traced): PML's zero rule
        (every list of at most one pair) is applied with ``torch.where`` on the terms."""
        a1, p, a2, n = idx
        zero = (torch.ones_like(a1).sum() <= 1) & (torch.ones_like(a2).sum() <= 1)
        pos_loss = F.relu(self.distance.margin(geo.raw(a1, p), self.pos_margin))
        neg_loss = F.relu(self.distance.margin(self.neg_margin, geo.raw(a2, n)))
        pos_loss = torch.where(zero, torch.zeros_like(pos_loss), pos_loss)
        neg_loss = torch.where(zero, torch.zeros_like(neg_loss), neg_loss)
        return {
            "pos_loss": {"losses": pos_loss, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg_loss, "indices": (a2, n), "reduction_type": "neg_pair"},
        }


# ------------------------------------------------------------------------------------------------------------
# triplet margin
# ------------------------------------------------------------------------------------------------------------
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
        return AvgNonZeroReducer()

    def compute_loss(self, inp, indices_tuple):
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
            return self._fused(geo, f["square"], f["y"], f["z"], f["excl"], f["band"][0], f["band"][1], win)
        rp = _row_pairs(indices_tuple, inp) if (win is not None and not self.swap) else None
        if rp is not None:
            # one triplet (a, p_a, n_a) per valid anchor, evaluated over all anchors with the others masked
            return _chosen_triplets(geo, rp["valid"], rp["p"], rp["neg"], self.margin, self.smooth_loss, win)
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


# ------------------------------------------------------------------------------------------------------------
# the write-up's paired contrastive loss
# ------------------------------------------------------------------------------------------------------------
class PairedContrastiveLoss(torch.nn.Module):
    """The write-up's contrastive loss on given pairs (Hadsell et al. 2006, squared hinges, weighted):

    for each row t, with ``d_t`` the distance between ``x[t]`` and ``y[t]``::

        L = sum_t  w * d_t^2                      if x_labels[t] == y_labels[t]
                   (1 - w) * relu(margin - d_t)^2  otherwise

    ``w = positive_weight``. Default distance: plain Euclidean, ``LpDistance(normalize_embeddings=False)``
    (any distance, not a similarity; the pair distances are exact, by direct differences, through
    ``ops.pair_values`` for fused distances). Call: ``loss(x, y, x_labels, y_labels)``.
    """

    def __init__(
        self,
        distance=None,
        margin=1.0,
        positive_weight=0.5,
        embedding_regularizer=None,
        embedding_reg_weight=1,
        collect_stats=None,
    ):
        super().__init__()
        self.distance = LpDistance(normalize_embeddings=False) if distance is None else distance
        if getattr(self.distance, "is_inverted", False):
            raise ValueError("PairedContrastiveLoss needs a distance, not a similarity (is_inverted=True)")
        self.margin = V.check_number(margin, "margin")
        self.positive_weight = V.check_number(positive_weight, "positive_weight")
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.collect_stats = bool(collect_stats) if collect_stats is not None else False

    def pair_distances(self, x, y):
        from .distances import fused_spec

        spec = fused_spec(self.distance)
        if spec is not None:
            kind, normalize = spec
            xn = _normalize(x) if normalize else x
            yn = _normalize(y) if normalize else y
            idx = torch.arange(x.shape[0], device=x.device)
            return ops.pair_values(xn, yn, idx, idx, kind)  # (float32 for half precision)
        d = self.distance.pairwise_distance(self.distance.maybe_normalize(x), self.distance.maybe_normalize(y))
        power = getattr(self.distance, "power", 1)
        return d**power if power != 1 else d

    def forward(self, x, y, x_labels, y_labels):
        V.check_embeddings(x, "x")
        V.check_ref(x, y, "y")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must have the same number of rows (pairs), got {x.shape[0]} and {y.shape[0]}")
        V.check_labels(x_labels, x.shape[0], "x_labels")
        V.check_labels(y_labels, x.shape[0], "y_labels")
        x_labels = V.move_labels(x_labels, x.device)
        y_labels = V.move_labels(y_labels, x.device)
        equal = x_labels == y_labels
        d = self.pair_distances(x, y)
        w = self.positive_weight
        pos = w * d.square()
        neg = (1 - w) * F.relu(self.margin - d).square()
        terms = torch.where(equal, pos, neg)
        loss = terms.sum()
        if self.collect_stats:
            with torch.no_grad():
                self.num_pos_pairs = int(equal.sum())
                self.num_neg_pairs = int((~equal).sum())
                self.fraction_nonzero = float((terms > 0).float().mean()) if terms.numel() else 0.0
        if self.embedding_regularizer is not None:
            loss = loss + self.embedding_regularizer(torch.cat([x, y])) * self.embedding_reg_weight
        return loss.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# one-pass batch losses
# ------------------------------------------------------------------------------------------------------------
def _plain_euclidean():
    return LpDistance(normalize_embeddings=False)


class BatchHardTripletLoss(BaseMetricLossFunction):
    """Batch-hard triplet loss (Hermans et al. 2017; TF-Addons ``triplet_hard_loss``) in one pass.

    Per anchor i: the farthest positive ``p*`` (max d') and the nearest negative ``n*`` (min d'), ties to the
    lowest index; term ``relu(d_ip* - d_in* + margin)``, or ``softplus(d_ip* - d_in*)`` (``log1p(exp(.))``) with
    ``soft=True`` (the margin is then unused, as TF-Addons); the mean over anchors (the ``reducer``, MeanReducer
    by default). Defaults as TF-Addons: ``margin=1.0``, plain Euclidean distance (no normalization).

    Anchors without a positive or without a negative are dropped (PML's BatchHardMiner); TF-Addons' masked
    max/min instead give them a non-zero hinge (a one-class batch returns the margin). A batch with no usable
    anchor returns zero with zero gradient. Equal to ``TripletMarginLoss(margin, reducer=MeanReducer())`` fed
    by ``BatchHardMiner``. Cost: one mining sweep (``ops.row_hardest``), then O(N D) for the chosen pairs.

    Stats (``collect_stats=True``): ``num_anchors`` (anchors used), ``num_positive_triplets``,
    ``fraction_positive_triplets``, ``avg_hardest_pos_dist``, ``avg_hardest_neg_dist``.
    """

    _stat_names = (
        "num_anchors",
        "num_positive_triplets",
        "fraction_positive_triplets",
        "avg_hardest_pos_dist",
        "avg_hardest_neg_dist",
    )
    _indices_supported = False

    def __init__(self, margin=1.0, soft=False, **kwargs):
        self.margin = V.check_number(margin, "margin")
        self.soft = bool(soft)
        super().__init__(**kwargs)

    def get_default_distance(self):
        return _plain_euclidean()

    def compute_loss(self, inp, indices_tuple):
        geo = Geometry(self.distance, inp)
        _, ip, fp, _, ineg, fn = geo.row_hardest()  # one sweep for both picks
        win = self.window("loss")
        if win is not None and not self.collect_stats:
            # fused: every anchor is evaluated and the unusable ones masked, so no shape depends on the data
            # (no host sync, torch.compile traces it whole); the reducer's window gives S / C
            margin = 0.0 if self.soft else self.margin
            return _chosen_triplets(geo, fp & fn, ip, ineg, margin, self.soft, win)
        a = torch.nonzero(fp & fn).flatten()
        if a.numel() == 0:
            return self.zero_losses()
        p, n = ip[a], ineg[a]
        dap, dan = geo.dprime_two(a, p, a, n)
        v = dap - dan
        loss = F.softplus(v) if self.soft else F.relu(v + self.margin)
        if self.collect_stats:
            with torch.no_grad():
                sign = -1.0 if geo.inverted else 1.0
                self.num_anchors = int(a.numel())
                self.num_positive_triplets = int((loss > 0).sum())
                self.fraction_positive_triplets = self.num_positive_triplets / self.num_anchors
                self.avg_hardest_pos_dist = float(sign * dap.mean())
                self.avg_hardest_neg_dist = float(sign * dan.mean())
        return {"loss": {"losses": loss, "indices": (a, p, n), "reduction_type": "triplet"}}


class BatchAllTripletLoss(TripletMarginLoss):
    """Batch-all triplet loss: every valid triplet (i, p in P(i), n in Q(i)), ``relu(d_ip - d_in + margin)``, in
    one fused sweep (``ops.triplet_stats``), nothing listed.

    ``average="nonzero"`` (default): the mean over the positive terms (AvgNonZero, as PML's TripletMarginLoss
    default); ``average="all"``: the mean over all valid triplets. (A ``reducer`` argument overrides both.)
    Defaults: ``margin=0.2``, plain Euclidean distance (no normalization). Equal to
    ``TripletMarginLoss(margin, distance=...)`` with the same reducer.

    Stats (``collect_stats=True``): ``num_valid_triplets``, ``num_positive_triplets``,
    ``fraction_positive_triplets`` (one extra counting sweep each, no gradient).
    """

    _stat_names = ("num_valid_triplets", "num_positive_triplets", "fraction_positive_triplets")
    _indices_supported = False

    def __init__(self, margin=0.2, average="nonzero", smooth_loss=False, **kwargs):
        V.check_choice(average, ("nonzero", "all"), "average")
        self.average = average
        super().__init__(margin=margin, smooth_loss=smooth_loss, **kwargs)

    def get_default_distance(self):
        return _plain_euclidean()

    def get_default_reducer(self):
        return AvgNonZeroReducer() if self.average == "nonzero" else MeanReducer()

    def _fused_stats(self, geo, square, y, z, excl, band_lo, band_hi, st):
        if not self.collect_stats:
            return
        with torch.no_grad():
            r = _r_for(geo, square)
            x = geo.x.detach()
            r = None if r is None else r.detach()
            args = (x, y, r, z, excl, geo.kind, self.margin, self.smooth_loss, band_lo, band_hi)
            valid = float(ops.triplet_stats(*args, -INF, INF)[1])
            positive = float(ops.triplet_stats(*args, 0.0, INF)[1])
        self.num_valid_triplets = int(valid)
        self.num_positive_triplets = int(positive)
        self.fraction_positive_triplets = positive / valid if valid else 0.0

    def _given(self, geo, idx):
        out = super()._given(geo, idx)
        if self.collect_stats:
            losses = out["loss"]["losses"]
            if torch.is_tensor(losses):
                self.num_valid_triplets = int(losses.numel())
                self.num_positive_triplets = int((losses > 0).sum())
                self.fraction_positive_triplets = self.num_positive_triplets / max(1, self.num_valid_triplets)
        return out


class SemiHardTripletLoss(BaseMetricLossFunction):
    """FaceNet semi-hard triplet loss with TF-Addons' ``triplet_semihard_loss`` semantics, in one pass.

    For every positive pair (i, p): ``n*`` = the nearest negative farther than p (smallest d_in with
    ``d_in > d_ip``), or, if none, the farthest negative; term ``relu(d_ip - d_in* + margin)``; the mean over the
    positive pairs (the ``reducer``: MeanReducer by default; other windowed reducers work, and any other reducer
    gets the per-element terms from a materialized selection). Defaults as TF-Addons: ``margin=1.0``, plain
    Euclidean distance.

    Anchors without a negative are dropped (TF-Addons' masked maximum would give their positive pairs the
    term ``margin + d_ip``); no usable pair gives zero with zero gradient.

    Stats (``collect_stats=True``): ``num_pos_pairs`` (the pairs averaged over), ``num_positive_triplets`` and
    ``fraction_positive_triplets`` (terms > 0; computed on a materialized selection, O(N M) memory).
    """

    _stat_names = ("num_pos_pairs", "num_positive_triplets", "fraction_positive_triplets")
    _indices_supported = False

    def __init__(self, margin=1.0, **kwargs):
        self.margin = V.check_number(margin, "margin")
        super().__init__(**kwargs)

    def get_default_distance(self):
        return _plain_euclidean()

    def compute_loss(self, inp, indices_tuple):
        geo = Geometry(self.distance, inp)
        win = self.window("loss")
        emb = inp.embeddings
        if geo.spec is not None and win is not None and win[:2] == (-INF, INF):
            st = ops.semihard_stats(geo.x, inp.y, geo.r, inp.z, inp.excl, geo.kind, self.margin)
            if self.collect_stats:
                with torch.no_grad():
                    self._set_stats(self._per_element(geo, inp)["loss"]["losses"])
            return {"loss": _already_reduced(window_value(st[0], st[1], win, emb))}
        out = self._per_element(geo, inp)
        if self.collect_stats:
            self._set_stats(out["loss"]["losses"])
        return out

    def _set_stats(self, terms):
        n = int(terms.numel()) if torch.is_tensor(terms) else 0
        self.num_pos_pairs = n
        self.num_positive_triplets = int((terms > 0).sum()) if n else 0
        self.fraction_positive_triplets = self.num_positive_triplets / n if n else 0.0

    def _per_element(self, geo, inp):
        """Select on a materialized d' matrix, then evaluate the chosen pairs (differentiable)."""
        if geo.spec is not None:
            with torch.no_grad():
                r = None if geo.r is None else geo.r.detach()
                dmat = reference.signed_distance_matrix(geo.x.detach(), r, geo.kind)
        else:
            dmat = geo.dprime_matrix().detach()  # cached with its graph: dprime() below reuses it
        with torch.no_grad():
            pos, neg = geo.masks()
            a, p, n = reference.semihard_select_from_matrix(dmat, pos, neg)
        if a.numel() == 0:
            return self.zero_losses()
        dap, dan = geo.dprime_two(a, p, a, n)
        loss = F.relu(dap - dan + self.margin)
        return {"loss": {"losses": loss, "indices": (a, p, n), "reduction_type": "triplet"}}


def __getattr__(name):
    if name == "CrossBatchMemory":
        # fastdml's own wrapper (fastdml/cross_batch_memory.py), imported on first use
        from .cross_batch_memory import CrossBatchMemory

        return CrossBatchMemory
    from ._fallback import pml_fallback

    return pml_fallback(__name__, "losses", name, __all__)

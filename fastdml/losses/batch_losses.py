"""One-pass batch losses PML reaches only through miner + loss: batch-hard, batch-all, semi-hard."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from .. import ops, reference
from .._common import INF, Geometry, window_value
from ..distances import LpDistance
from ..reducers import AvgNonZeroReducer, MeanReducer
from ._paths import _already_reduced, _chosen_triplets, _r_for
from .base_metric_loss_function import BaseMetricLossFunction
from .triplet_margin_loss import TripletMarginLoss


def _plain_euclidean():
    return LpDistance(normalize_embeddings=False)


class _OnePassTripletLoss(BaseMetricLossFunction):
    """PML's hooks shared by the one-pass batch losses: Euclidean distance by default, and ``compute_loss``
    as the per-element terms of the fused computation."""

    def get_default_distance(self):
        """PML's hook: the distance used when none is given."""
        return _plain_euclidean()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the per-element loss dict (the terms, not their fused reduction)."""
        return self._per_element_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)


class BatchHardTripletLoss(_OnePassTripletLoss):
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

    def _compute(self, inp, indices_tuple):
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
        """PML's hook: the distance used when none is given."""
        return _plain_euclidean()

    def get_default_reducer(self):
        """PML's hook: the reducer used when none is given."""
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


class SemiHardTripletLoss(_OnePassTripletLoss):
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

    def _compute(self, inp, indices_tuple):
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

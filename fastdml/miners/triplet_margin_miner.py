"""PML's ``TripletMarginMiner``, unlisted until read (fused into TripletMarginLoss)."""

from __future__ import annotations

import torch

from .. import _validation as V
from .. import ops
from .._common import INF, BandRecord
from ..lazy import make_lazy
from .base_miner import BaseMiner, _raw_matrix


class TripletMarginMiner(BaseMiner):
    """PML's ``TripletMarginMiner``: the triplets with ``t = d_an - d_ap`` (``s_ap - s_an`` for similarities)
    ``<= margin`` (``"all"``), ``<= min(margin, 0)`` (``"hard"``), in ``(0, margin]`` (``"semihard"``), or
    ``> margin`` (``"easy"``); PML's lexicographic (a, p, n) order."""

    _stat_names = ("avg_triplet_margin", "pos_pair_dist", "neg_pair_dist")
    TYPES = ("all", "hard", "semihard", "easy")

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        self.margin = V.check_number(margin, "margin")
        self.type_of_triplets = V.check_choice(type_of_triplets, self.TYPES, "type_of_triplets")
        super().__init__(**kwargs)

    def band(self):
        """The miner's selection as an interval ``(lo, hi]`` of ``t = d'_an - d'_ap``."""
        m = self.margin
        return {
            "all": (-INF, m),
            "hard": (-INF, min(m, 0.0)),
            "semihard": (0.0, m),
            "easy": (m, INF),
        }[self.type_of_triplets]

    def _mine(self, inp):
        geo = self._geometry(inp)
        lo, hi = self.band()
        if self.collect_stats:
            self._set_stats(geo)
        if geo.spec is None:
            return make_lazy(3, value=geo.triplet_list(lo, hi))
        x, r, y, z, excl, kind = geo.x, geo.r, inp.y, inp.z, inp.excl, geo.kind

        def builder():
            return ops.triplet_list(x, y, r, z, excl, kind, lo, hi)

        def counter():
            with torch.no_grad():
                return (int(ops.triplet_stats(x, y, r, z, excl, kind, 0.0, False, lo, hi, -INF, INF)[1]),)

        return make_lazy(3, builder, fuse=BandRecord.of("triplet_band", inp, geo, (lo, hi)), counter=counter)

    def _set_stats(self, geo):
        mat = _raw_matrix(geo)
        a, p, n = geo.triplet_list()
        ap, an = mat[a, p], mat[a, n]
        margin = ap - an if geo.inverted else an - ap
        self.pos_pair_dist = torch.mean(ap).item()
        self.neg_pair_dist = torch.mean(an).item()
        self.avg_triplet_margin = torch.mean(margin).item()

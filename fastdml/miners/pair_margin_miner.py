"""PML's ``PairMarginMiner``, unlisted until read (fused into ContrastiveLoss)."""

from __future__ import annotations

import torch

from .. import _validation as V
from .. import ops
from .._common import INF, BandRecord
from ..lazy import make_lazy
from .base_miner import BaseMiner


class PairMarginMiner(BaseMiner):
    """PML's ``PairMarginMiner``: positive pairs with ``d > pos_margin`` and negative pairs with
    ``d < neg_margin`` (for similarities ``s < pos_margin`` and ``s > neg_margin``), row-major order."""

    _stat_names = ("pos_pair_dist", "neg_pair_dist")

    def __init__(self, pos_margin=0.2, neg_margin=0.8, **kwargs):
        self.pos_margin = V.check_number(pos_margin, "pos_margin")
        self.neg_margin = V.check_number(neg_margin, "neg_margin")
        super().__init__(**kwargs)

    def thresholds(self, inverted):
        """``(pos_lo, neg_hi)`` in d' (larger is farther): positives with ``d' > pos_lo``, negatives ``d' < neg_hi``."""
        if inverted:
            return -self.pos_margin, -self.neg_margin
        return self.pos_margin, self.neg_margin

    def _mine(self, inp):
        geo = self._geometry(inp)
        pos_lo, neg_hi = self.thresholds(geo.inverted)
        if self.collect_stats:
            a1, p, a2, n = geo.pair_list()
            pos, neg = geo.raw(a1, p), geo.raw(a2, n)
            self.pos_pair_dist = torch.mean(pos).item() if len(pos) > 0 else 0
            self.neg_pair_dist = torch.mean(neg).item() if len(neg) > 0 else 0
        if geo.spec is None:
            return make_lazy(4, value=geo.pair_list(pos_lo, neg_hi))
        x, r, y, z, excl, kind = geo.x, geo.r, inp.y, inp.z, inp.excl, geo.kind

        def builder():
            return ops.pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi)

        def counter():
            with torch.no_grad():
                st = ops.contrastive_stats(x, y, r, z, excl, kind, 0.0, 0.0, pos_lo, neg_hi, -INF, INF)
            return int(st[1]), int(st[3])

        return make_lazy(4, builder, fuse=BandRecord.of("pair_band", inp, geo, (pos_lo, neg_hi)), counter=counter)

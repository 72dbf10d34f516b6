"""PML's ``BatchEasyHardMiner`` and ``BatchHardMiner``: one pair of each kind per anchor, no N x M matrix."""

from __future__ import annotations

import torch

from .._common import RowPairsRecord
from ..lazy import make_lazy
from .base_miner import BaseMiner


class BatchEasyHardMiner(BaseMiner):
    """PML's ``BatchEasyHardMiner``: per anchor one positive and one negative chosen by strategy.

    In d' (larger is farther): positive ``"hard"`` = farthest, ``"easy"`` = nearest, ``"semihard"`` = farthest
    nearer than the chosen negative; negative ``"hard"`` = nearest, ``"easy"`` = farthest, ``"semihard"`` =
    nearest farther than the chosen positive; ``"all"`` = every pair. ``allowed_pos_range`` /
    ``allowed_neg_range`` (raw values, closed) restrict the candidates. Ties go to the lowest index (PML's
    ``torch.max/min``). Returns ``(a, p, a, n)`` with the anchors that have both (PML's layouts for ``"all"``).
    """

    HARD = "hard"
    SEMIHARD = "semihard"
    EASY = "easy"
    ALL = "all"
    all_batch_mining_strategies = [HARD, SEMIHARD, EASY, ALL]
    _stat_names = (
        "easiest_triplet",
        "hardest_triplet",
        "easiest_pos_pair",
        "hardest_pos_pair",
        "easiest_neg_pair",
        "hardest_neg_pair",
    )

    def __init__(
        self, pos_strategy=EASY, neg_strategy=SEMIHARD, allowed_pos_range=None, allowed_neg_range=None, **kwargs
    ):
        strategies = self.all_batch_mining_strategies
        if pos_strategy not in strategies:
            raise ValueError(f"pos_strategy must be one of {tuple(strategies)}, got {pos_strategy!r}")
        if neg_strategy not in strategies:
            raise ValueError(f"neg_strategy must be one of {tuple(strategies)}, got {neg_strategy!r}")
        if pos_strategy == neg_strategy == self.SEMIHARD:
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if (pos_strategy == self.ALL and neg_strategy == self.SEMIHARD) or (
            neg_strategy == self.ALL and pos_strategy == self.SEMIHARD
        ):
            raise ValueError('"semihard" cannot be used in combination with "all"')
        for name, rng in (("allowed_pos_range", allowed_pos_range), ("allowed_neg_range", allowed_neg_range)):
            if rng is not None and (not isinstance(rng, (tuple, list)) or len(rng) != 2):
                raise ValueError(f"{name} must be None or a (low, high) pair, got {rng!r}")
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = allowed_pos_range
        self.allowed_neg_range = allowed_neg_range
        super().__init__(**kwargs)

    def _pick(self, geo, side, strategy, thr=None):
        if side == "pos":
            mode = "min" if strategy == self.EASY else "max"
            lo, hi = geo.raw_interval_to_dprime(*(self.allowed_pos_range or (None, None)))
            thr_op = "lt" if thr is not None else ""
        else:
            mode = "max" if strategy == self.EASY else "min"
            lo, hi = geo.raw_interval_to_dprime(*(self.allowed_neg_range or (None, None)))
            thr_op = "gt" if thr is not None else ""
        return geo.row_extreme(side, mode, lo, hi, thr, thr_op)

    def _select(self, geo, inp):
        """PML's ``mine`` in d': returns the 4-tuple and the raw values for the stats."""
        ps, ns = self.pos_strategy, self.neg_strategy
        a = torch.arange(inp.n, device=inp.embeddings.device)
        pos = neg = None
        if ps == self.SEMIHARD and ns != self.ALL:
            neg = self._pick(geo, "neg", ns)
            pos = self._pick(geo, "pos", ps, thr=neg[0])
        elif ns == self.SEMIHARD and ps != self.ALL:
            pos = self._pick(geo, "pos", ps)
            neg = self._pick(geo, "neg", ns, thr=pos[0])
        elif ps == ns == self.HARD and self.allowed_pos_range is None and self.allowed_neg_range is None:
            # batch-hard (farthest positive, nearest negative, no ranges): both picks from one sweep
            h = geo.row_hardest()
            pos, neg = h[:3], h[3:]
        else:
            if ps != self.ALL:
                pos = self._pick(geo, "pos", ps)
            if ns != self.ALL:
                neg = self._pick(geo, "neg", ns)
        sign = -1.0 if geo.inverted else 1.0
        if pos is not None and neg is not None and not self.collect_stats:
            # one pair of each kind per anchor: kept as (valid, p, n) arrays over all anchors, listed on first
            # read; fastdml's losses evaluate the N pairs masked, with no data-dependent shape
            valid, pidx, nidx = pos[2] & neg[2], pos[1], neg[1]

            def builder():
                k = torch.nonzero(valid).flatten()
                return a[k], pidx[k], a[k], nidx[k]

            fuse = RowPairsRecord(inp.n, inp.m, valid, pidx, nidx)
            return builder, fuse, valid
        if pos is not None and neg is not None:
            keep = torch.nonzero(pos[2] & neg[2]).flatten()
            out = (a[keep], pos[1][keep], a[keep], neg[1][keep])
            pv, nv = sign * pos[0][keep], sign * neg[0][keep]
        else:
            a1, p, a2, n = geo.pair_list()
            if pos is not None:
                keep = torch.nonzero(pos[2]).flatten()
                a1, p, pv = a[keep], pos[1][keep], sign * pos[0][keep]
            else:
                pv = geo.raw(a1, p)
            if neg is not None:
                keep = torch.nonzero(neg[2]).flatten()
                a2, n, nv = a[keep], neg[1][keep], sign * neg[0][keep]
            else:
                nv = geo.raw(a2, n)
            out = (a1, p, a2, n)
        if self.collect_stats:
            self._set_stats(geo, pv, nv)
        return out

    def _mine(self, inp):
        geo = self._geometry(inp)
        out = self._select(geo, inp)
        if callable(out[0]):
            builder, fuse, valid = out
            return make_lazy(4, builder, fuse=fuse, counter=lambda: (int(valid.sum()),) * 2)
        return make_lazy(4, value=out)

    def _set_stats(self, geo, pv, nv):
        def func(min_if_inverted):
            if min_if_inverted:
                return torch.min if geo.inverted else torch.max
            return torch.max if geo.inverted else torch.min

        both = self.ALL not in (self.pos_strategy, self.neg_strategy)
        if len(pv) > 0 and len(nv) > 0 and both:
            self.easiest_triplet = func(False)(pv - nv).item()
            self.hardest_triplet = func(True)(pv - nv).item()
        if len(pv) > 0:
            self.easiest_pos_pair = func(False)(pv).item()
            self.hardest_pos_pair = func(True)(pv).item()
        if len(nv) > 0:
            self.easiest_neg_pair = func(True)(nv).item()
            self.hardest_neg_pair = func(False)(nv).item()


class BatchHardMiner(BatchEasyHardMiner):
    """PML's ``BatchHardMiner``: per anchor the farthest positive and the nearest negative; ``(a, p, n)`` for
    the anchors that have both."""

    def __init__(self, **kwargs):
        super().__init__(pos_strategy=self.HARD, neg_strategy=self.HARD, **kwargs)

    def _mine(self, inp):
        geo = self._geometry(inp)
        out = self._select(geo, inp)
        if callable(out[0]):
            builder4, fuse, valid = out

            def builder():
                a, p, _, n = builder4()
                return a, p, n

            return make_lazy(3, builder, fuse=fuse, counter=lambda: (int(valid.sum()),))
        a, p, _, n = out
        return make_lazy(3, value=(a, p, n))

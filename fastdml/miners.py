"""Miners, drop-in for ``pytorch_metric_learning.miners``.

Called as PML's ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` (under ``torch.no_grad``), they
return PML's index tuple, ``(a, p, n)`` or ``(a1, p, a2, n)``, int64, with the same indices in the same order,
as a :class:`fastdml.lazy.LazyIndices`: a tuple that is listed on first read. Fed to a fastdml loss on the same
embeddings tensor, the listing miners are evaluated fused instead (nothing listed):

* ``TripletMarginMiner`` + ``TripletMarginLoss``: one ``ops.triplet_stats`` sweep with the miner's band;
* ``PairMarginMiner`` + ``ContrastiveLoss``: one ``ops.contrastive_stats`` sweep with the miner's thresholds.

``BatchHardMiner`` / ``BatchEasyHardMiner`` choose one pair per anchor with ``ops.row_extreme`` (no N x M
matrix; hard/hard without ranges: both picks from one ``ops.row_hardest`` sweep) and keep ``(valid, p, n)``
over all anchors; the losses evaluate those N pairs with ``ops.pair_values``, the anchors without a pair
masked, so no shape depends on the data (``torch.compile`` traces miner + loss whole; inside a traced region
the result is a :class:`fastdml.lazy.TracedIndices`).
With an ``"all"`` strategy or ``collect_stats`` they list eagerly. ``MultiSimilarityMiner``
sorts the rows of a materialized matrix (PML's algorithm). A distance without a fused spec uses its own matrix.

The counts PML records on every call (``num_triplets``, ``num_pos_pairs``, ``num_neg_pairs``) are computed on
first read, by a counting sweep when the result has not been listed. With ``collect_stats=True`` the miners
also set PML's statistics (``pos_pair_dist``, ``neg_pair_dist``, ``avg_triplet_margin``, ``easiest_triplet``,
...), which are means/extremes over all pairs or triplets and are computed on the materialized matrix.
"""

from __future__ import annotations

import torch

from . import _validation as V
from . import ops, reference
from ._common import INF, Geometry, resolve_inputs
from .distances import CosineSimilarity, LpDistance
from .lazy import make_lazy

__all__ = [
    "BaseMiner",
    "TripletMarginMiner",
    "PairMarginMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "MultiSimilarityMiner",
]


class BaseMiner(torch.nn.Module):
    """PML's ``BaseMiner``: ``forward(embeddings, labels, ref_emb=None, ref_labels=None)`` under no_grad."""

    _stat_names: tuple = ()

    def __init__(self, distance=None, collect_stats=None):
        super().__init__()
        self.collect_stats = bool(collect_stats) if collect_stats is not None else False
        self.distance = self.get_default_distance() if distance is None else distance
        self._last_arity = self._last_counts = self._last_handle = None
        self.reset_stats()

    def get_default_distance(self):
        return LpDistance(p=2)

    def reset_stats(self):
        if self.collect_stats:
            for k in self._stat_names:
                setattr(self, k, 0)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """The mined index tuple (a :class:`~fastdml.lazy.LazyIndices`)."""
        self.reset_stats()
        with torch.no_grad():
            inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels, labels_required=True)
            out = self.mine(inp)
        self._remember(out)
        return out

    def _remember(self, out):
        # the counts PML records, readable later without keeping the result (and through it the embeddings'
        # graph) alive: a counting closure over the detached inputs, or the listed tuple once it is read
        self._last_arity = len(out)
        self._last_counts = None
        self._last_handle = out.count_handle()

    def mine(self, inp):
        raise NotImplementedError

    # PML sets these on every call; here they are counted on first read
    def _count(self, slot):
        if self._last_arity is None:
            return 0
        if self._last_counts is None:
            self._last_counts = self._last_handle()
            self._last_handle = None
        counts = self._last_counts
        arity = self._last_arity
        if arity == 3:
            return counts[0] if slot == "t" else 0
        return {"p": counts[0], "n": counts[1]}.get(slot, 0)

    @property
    def num_triplets(self):
        return self._count("t")

    @property
    def num_pos_pairs(self):
        return self._count("p")

    @property
    def num_neg_pairs(self):
        return self._count("n")


def _fuse_record(op, inp, geo, band):
    return {
        "op": op,
        "x": inp.embeddings,
        "ref": inp.ref_emb,
        # (not read when traced: see losses._lazy_fuse)
        "versions": None if torch.compiler.is_compiling() else (inp.embeddings._version, inp.ref_emb._version),
        "spec": geo.spec,
        "square": inp.square,
        "y": inp.y,
        "z": inp.z,
        "excl": inp.excl,
        "band": band,
    }


def _raw_matrix(geo):
    """The raw (PML-convention) matrix, exact, for statistics."""
    if geo.spec is None:
        return geo.mat
    d = reference.signed_distance_matrix(geo.x, geo.r, geo.kind)
    return -d if geo.kind == "dot" else d


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

    def mine(self, inp):
        geo = Geometry(self.distance, inp)
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

        return make_lazy(3, builder, fuse=_fuse_record("triplet_band", inp, geo, (lo, hi)), counter=counter)

    def _set_stats(self, geo):
        mat = _raw_matrix(geo)
        a, p, n = geo.triplet_list()
        ap, an = mat[a, p], mat[a, n]
        margin = ap - an if geo.inverted else an - ap
        self.pos_pair_dist = torch.mean(ap).item()
        self.neg_pair_dist = torch.mean(an).item()
        self.avg_triplet_margin = torch.mean(margin).item()


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

    def mine(self, inp):
        geo = Geometry(self.distance, inp)
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

        return make_lazy(4, builder, fuse=_fuse_record("pair_band", inp, geo, (pos_lo, neg_hi)), counter=counter)


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

            fuse = {"op": "row_pairs", "n": inp.n, "m": inp.m, "valid": valid, "p": pidx, "neg": nidx}
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

    def mine(self, inp):
        geo = Geometry(self.distance, inp)
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

    def mine(self, inp):
        geo = Geometry(self.distance, inp)
        out = self._select(geo, inp)
        if callable(out[0]):
            builder4, fuse, valid = out

            def builder():
                a, p, _, n = builder4()
                return a, p, n

            return make_lazy(3, builder, fuse=fuse, counter=lambda: (int(valid.sum()),))
        a, p, _, n = out
        return make_lazy(3, value=(a, p, n))


class MultiSimilarityMiner(BaseMiner):
    """PML's ``MultiSimilarityMiner`` (Wang et al. 2019): positive pairs whose similarity is below the hardest
    negative's + epsilon, negative pairs above the hardest positive's - epsilon (distances: mirrored). Computed
    on the materialized matrix, sorting each row as PML does. Default distance: CosineSimilarity."""

    def __init__(self, epsilon=0.1, **kwargs):
        self.epsilon = V.check_number(epsilon, "epsilon")
        super().__init__(**kwargs)

    def get_default_distance(self):
        return CosineSimilarity()

    def mine(self, inp):
        geo = Geometry(self.distance, inp)
        dev = inp.embeddings.device
        a1, p, a2, n = geo.pair_list()
        if len(a1) == 0 or len(a2) == 0:
            e = torch.zeros(0, dtype=torch.long, device=dev)
            return make_lazy(4, value=(e, e.clone(), e.clone(), e.clone()))
        mat = geo.mat
        inv = geo.inverted
        pos_ignore = float("inf") if inv else float("-inf")
        neg_ignore = float("-inf") if inv else float("inf")
        mat_neg = mat.clone()
        mat_pos = mat.clone()
        mat_pos[a2, n] = pos_ignore
        mat_neg[a1, p] = neg_ignore
        if inp.embeddings is inp.ref_emb:
            mat_pos.fill_diagonal_(pos_ignore)
            mat_neg.fill_diagonal_(neg_ignore)
        pos_sorted, pos_idx = torch.sort(mat_pos, dim=1)
        neg_sorted, neg_idx = torch.sort(mat_neg, dim=1)
        eps = self.epsilon
        if inv:
            hard_pos = torch.where(pos_sorted - eps < neg_sorted[:, -1].unsqueeze(1))
            hard_neg = torch.where(neg_sorted + eps > pos_sorted[:, 0].unsqueeze(1))
        else:
            hard_pos = torch.where(pos_sorted + eps > neg_sorted[:, 0].unsqueeze(1))
            hard_neg = torch.where(neg_sorted - eps < pos_sorted[:, -1].unsqueeze(1))
        ra, rn = hard_pos[0], hard_neg[0]
        return make_lazy(4, value=(ra, pos_idx[ra, hard_pos[1]], rn, neg_idx[rn, hard_neg[1]]))


def __getattr__(name):
    from ._fallback import pml_fallback

    return pml_fallback(__name__, "miners", name, __all__)

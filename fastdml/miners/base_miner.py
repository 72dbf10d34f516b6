"""PML's ``BaseMiner``: the call, statistics, and the counts PML records on every call."""

from __future__ import annotations

import torch

from .. import reference
from .._common import resolve_inputs
from ..distances import LpDistance


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


def _raw_matrix(geo):
    """The raw (PML-convention) matrix, exact, for statistics."""
    if geo.spec is None:
        return geo.mat
    d = reference.signed_distance_matrix(geo.x, geo.r, geo.kind)
    return -d if geo.kind == "dot" else d

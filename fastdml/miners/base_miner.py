"""PML's ``BaseMiner``: the call, statistics, and the counts PML records on every call."""

from __future__ import annotations

import torch

from .. import dispatch, reference
from .._common import Geometry, overrides_hook, resolve_inputs
from ..distances import LpDistance
from ..utils.common_functions import resolve_collect_stats


class BaseMiner(torch.nn.Module):
    """PML's ``BaseMiner``: ``forward(embeddings, labels, ref_emb=None, ref_labels=None)`` under no_grad.

    PML's hook ``mine(embeddings, labels, ref_emb, ref_labels)`` returns a plain tuple of int64 index tensors
    (fastdml's miners: the listed selection); ``output_assertion`` checks it and records ``num_triplets`` or
    ``num_pos_pairs`` / ``num_neg_pairs``. fastdml's own miners are called through ``_mine`` instead (a lazy
    result, fused into fastdml's losses) unless a subclass overrides ``mine`` or ``output_assertion``.
    """

    _stat_names: tuple = ()
    _fused_hooks: tuple = ("mine", "output_assertion")
    _mine = None  # fastdml's implementation, ``_mine(inp) -> LazyIndices``

    def __init__(self, distance=None, collect_stats=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)
        self.distance = self.get_default_distance() if distance is None else distance
        self._last_arity = self._last_counts = self._last_handle = None
        self.reset_stats()

    def get_default_distance(self):
        """PML's hook: the distance used when none is given."""
        return LpDistance(p=2)

    def reset_stats(self):
        """PML's hook: zero the statistics this object records."""
        if self.collect_stats:
            for k in self._stat_names:
                setattr(self, k, 0)
            self._last_arity, self._last_counts, self._last_handle = None, {}, None

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """The mined index tuple (fastdml's miners: a :class:`~fastdml.lazy.LazyIndices`)."""
        self.reset_stats()
        fused = type(self)._mine is not None and not overrides_hook(self, *self._fused_hooks)
        with torch.no_grad():
            inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels, True, self.distance)
            if fused:
                out = self._mine(inp)
            else:
                out = self.mine(embeddings, inp.labels, inp.ref_emb, inp.ref_labels)
        if fused:
            self._remember(out)
        else:
            self.output_assertion(out)
        return out

    def _geometry(self, inp):
        """The distances a miner selects on: fused, or the distance object's matrix where
        :func:`fastdml.dispatch.miner_on_matrix` says (float16 on the CPU: PML's picks)."""
        return Geometry(self.distance, inp, generic=dispatch.miner_on_matrix(inp.embeddings))

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """PML's hook: the plain tuple ``(a, p, n)`` or ``(a1, p, a2, n)`` of int64 index tensors."""
        if type(self)._mine is None:
            raise NotImplementedError
        with torch.no_grad():
            inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels, True, self.distance)
            return tuple(self._mine(inp))

    def output_assertion(self, output):
        """PML's check of a mined tuple; records ``num_triplets`` or ``num_pos_pairs`` / ``num_neg_pairs``."""
        if len(output) == 3:
            self.num_triplets = len(output[0])
            if not self.num_triplets == len(output[1]) == len(output[2]):
                raise ValueError("a mined triplet tuple must hold three index lists of one length")
        elif len(output) == 4:
            self.num_pos_pairs = len(output[0])
            self.num_neg_pairs = len(output[2])
            if self.num_pos_pairs != len(output[1]) or self.num_neg_pairs != len(output[3]):
                raise ValueError("a mined pair tuple must hold (a1, p) and (a2, n) lists of equal lengths")
        else:
            raise TypeError(f"a miner must return 3 or 4 index tensors, got {len(output)}")

    def _remember(self, out):
        # the counts PML records, readable later without keeping the result (and through it the embeddings'
        # graph) alive: a counting closure over the detached inputs, or the listed tuple once it is read
        self._last_arity = len(out)
        self._last_counts = None
        self._last_handle = out.count_handle()

    # PML sets these on every call; after a fused call they are counted on first read
    def _count(self, slot):
        if self._last_counts is None:
            if self._last_handle is None:
                return 0
            c = self._last_handle()
            self._last_counts = {"t": c[0]} if self._last_arity == 3 else {"p": c[0], "n": c[1]}
            self._last_handle = None
        return self._last_counts.get(slot, 0)

    def _set_count(self, slot, value):
        if self._last_counts is None:
            self._last_counts, self._last_handle = {}, None
        self._last_counts[slot] = value

    num_triplets = property(lambda self: self._count("t"), lambda self, v: self._set_count("t", v))
    num_pos_pairs = property(lambda self: self._count("p"), lambda self, v: self._set_count("p", v))
    num_neg_pairs = property(lambda self: self._count("n"), lambda self, v: self._set_count("n", v))


class BaseTupleMiner(BaseMiner):
    """PML's earlier name for a miner returning an index tuple (every miner here does): :class:`BaseMiner`."""


def _raw_matrix(geo):
    """The raw (PML-convention) matrix, exact, for statistics."""
    if geo.spec is None:
        return geo.mat
    d = reference.signed_distance_matrix(geo.x, geo.r, geo.kind)
    return -d if geo.kind == "dot" else d

"""PML's ``BaseMetricLossFunction``: the call, distance, reducer, regularizer and statistics plumbing."""

from __future__ import annotations

import copy

import torch

from .. import _validation as V
from .._common import overrides_hook, resolve_inputs
from ..distances import LpDistance
from ..reducers import MeanReducer, MultipleReducers, is_do_nothing, is_multiple, reducer_window
from ..utils.common_functions import resolve_collect_stats
from ._paths import _already_reduced


class BaseMetricLossFunction(torch.nn.Module):
    """PML's ``BaseMetricLossFunction``: distance, reducer, embedding regularizer, collect_stats, and the call
    ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

    _stat_names: tuple = ()
    _indices_supported = True
    _terms_only = False  # a direct compute_loss call: the per-element terms, every window off

    def __init__(
        self,
        distance=None,
        reducer=None,
        embedding_regularizer=None,
        embedding_reg_weight=1,
        collect_stats=None,
    ):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.distance = self.get_default_distance() if distance is None else distance
        self.set_reducer(reducer)
        self.reset_stats()

    # ---- PML plumbing ----
    def get_default_distance(self):
        """PML's hook: the distance used when none is given."""
        return LpDistance(p=2)

    def get_default_reducer(self):
        """PML's hook: the reducer used when none is given."""
        return MeanReducer()

    def _sub_loss_names(self):
        return ["loss"]

    def sub_loss_names(self):
        """PML's hook: the names of the loss dict's entries (``_sub_loss_names``)."""
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
        """The reducer applied to one sub-loss (PML's ``MultipleReducers`` when there are several)."""
        if is_multiple(self.reducer):
            r = self.reducer
            return r.reducers[name] if name in r.reducers else r.default_reducer
        return self.reducer

    def window(self, name):
        """The fused window of sub-loss ``name``'s reducer, or None (per-element path)."""
        if is_do_nothing(self.reducer) or self._terms_only:
            return None
        return reducer_window(self.sub_reducer(name))

    def zero_losses(self):
        """PML's hook: a loss dict of zeros, one entry per sub-loss."""
        return {k: self.zero_loss() for k in self.sub_loss_names()}

    def reset_stats(self):
        """PML's hook: zero the statistics this object records."""
        if self.collect_stats:
            for k in self._stat_names:
                setattr(self, k, 0)

    # ---- the call ----
    # the PML hooks a fused path replaces: a subclass overriding one of them takes PML's general path
    _fused_hooks: tuple = ("compute_loss",)
    _compute = None  # fastdml's fused implementation, ``_compute(inp, indices_tuple) -> loss dict``

    def _fusable(self):
        return type(self)._compute is not None and not overrides_hook(self, *self._fused_hooks)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss (a 0-dim tensor), or the loss dict with a DoNothingReducer."""
        self.reset_stats()
        if indices_tuple is not None and not self._indices_supported:
            raise ValueError(f"indices_tuple is not supported by {type(self).__name__}: it selects its own triplets")
        if labels is None and indices_tuple is None:
            if torch.is_tensor(embeddings):
                raise ValueError("labels and indices_tuple cannot both be None")
            V.check_embeddings(embeddings, "embeddings")
        inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels, indices_tuple is None, self.distance)
        if self._fusable():
            loss_dict = self._compute(inp, indices_tuple)
        else:
            # PML's forward: the user's hook gets PML's arguments (ref_emb / ref_labels resolved as PML does)
            loss_dict = self.compute_loss(embeddings, inp.labels, indices_tuple, inp.ref_emb, inp.ref_labels)
        if self.embedding_regularizer is not None:
            reg = self.embedding_regularizer(embeddings) * self.embedding_reg_weight
            loss_dict["embedding_reg_loss"] = _already_reduced(reg)
        out = self.reducer(loss_dict, embeddings, inp.labels)
        if torch.is_tensor(out) and out.dtype != embeddings.dtype:
            # half-precision embeddings: computed in float32, rounded once here (PML returns their dtype)
            out = out.to(embeddings.dtype)
        return out

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the loss dict ``{name: {"losses", "indices", "reduction_type"}}`` of one call."""
        raise NotImplementedError

    def _resolve(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """A direct hook call's inputs, resolved as :meth:`forward` resolves them."""
        if labels is None and indices_tuple is None:
            raise ValueError("labels and indices_tuple cannot both be None")
        return resolve_inputs(embeddings, labels, ref_emb, ref_labels, indices_tuple is None, self.distance)

    def _per_element_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """``_compute`` with every reducer window off: the loss dict of the per-element terms, as PML's hook."""
        inp = self._resolve(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self._terms_only = True
        try:
            return self._compute(inp, indices_tuple)
        finally:
            self._terms_only = False

    def zero_loss(self):
        """PML's zero loss ``sum(embeddings * 0)`` (NaN for NaN embeddings)."""
        return _already_reduced(0)

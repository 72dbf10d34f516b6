"""PML's ``BaseMetricLossFunction``: the call, distance, reducer, regularizer and statistics plumbing."""

from __future__ import annotations

import copy

import torch

from .. import _validation as V
from .._common import resolve_inputs
from ..distances import LpDistance
from ..reducers import MeanReducer, MultipleReducers, is_do_nothing, is_multiple, reducer_window
from ._paths import _already_reduced


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

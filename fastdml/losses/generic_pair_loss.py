"""PML's ``GenericPairLoss``: a loss of the positive and negative pair distances, for subclassing."""

from __future__ import annotations

import torch

from .._common import Geometry
from ._paths import _convert_to_pairs, _materialize_indices
from .base_metric_loss_function import BaseMetricLossFunction


class GenericPairLoss(BaseMetricLossFunction):
    """PML's ``GenericPairLoss(mat_based_loss, **kwargs)``: ``compute_loss`` lists the pairs (all of them, or
    the ``indices_tuple``'s), builds the distance matrix and calls ``_compute_loss`` with either the pair
    distances ``(pos_pair, neg_pair, indices_tuple)`` or the matrix and 0/1 masks ``(mat, pos_mask, neg_mask)``.
    PML's rule: when every index list holds at most one pair, the loss is zero.

    A subclass implements ``_compute_loss`` as in PML. (fastdml's :class:`ContrastiveLoss` is one; it runs
    fused unless a subclass overrides one of these hooks.)
    """

    def __init__(self, mat_based_loss, **kwargs):
        super().__init__(**kwargs)
        self.loss_method = self.mat_based_loss if mat_based_loss else self.pair_based_loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the loss dict from the pair distances (matrix- or pair-based)."""
        inp = self._resolve(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        geo = Geometry(self.distance, inp, generic=True)
        if indices_tuple is None:
            indices_tuple = geo.pair_list()
        else:
            indices_tuple = _convert_to_pairs(_materialize_indices(indices_tuple, inp))
        if all(len(x) <= 1 for x in indices_tuple):
            return self.zero_losses()
        return self.loss_method(geo.mat, indices_tuple)

    def _compute_loss(self, *args):
        raise NotImplementedError

    def mat_based_loss(self, mat, indices_tuple):
        """PML's hook: the loss dict from the distance matrix and the positive and negative pair masks."""
        a1, p, a2, n = indices_tuple
        pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
        pos_mask[a1, p] = 1
        neg_mask[a2, n] = 1
        self._assert_either_pos_or_neg(pos_mask, neg_mask)
        return self._compute_loss(mat, pos_mask, neg_mask)

    def pair_based_loss(self, mat, indices_tuple):
        """PML's hook: the loss dict from the listed positive and negative pair distances."""
        a1, p, a2, n = indices_tuple
        pos_pair = mat[a1, p] if len(a1) > 0 else []
        neg_pair = mat[a2, n] if len(a2) > 0 else []
        return self._compute_loss(pos_pair, neg_pair, indices_tuple)

    @staticmethod
    def _assert_either_pos_or_neg(pos_mask, neg_mask):
        if torch.any((pos_mask != 0) & (neg_mask != 0)):
            raise ValueError("Each pair should be either be positive or negative")

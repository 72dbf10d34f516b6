"""A contrastive loss on given pairs (Hadsell et al. 2006)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from .. import ops
from .._common import _normalize
from ..distances import LpDistance, fused_spec
from ..utils.common_functions import resolve_collect_stats


class PairedContrastiveLoss(torch.nn.Module):
    """A contrastive loss on given pairs (Hadsell et al. 2006, squared hinges, weighted):

    for each row t, with ``d_t`` the distance between ``x[t]`` and ``y[t]``::

        L = sum_t  w * d_t^2                      if x_labels[t] == y_labels[t]
                   (1 - w) * relu(margin - d_t)^2  otherwise

    ``w = positive_weight``. Default distance: plain Euclidean, ``LpDistance(normalize_embeddings=False)``
    (any distance, not a similarity; the pair distances are exact, by direct differences, through
    ``ops.pair_values`` for fused distances). Call: ``loss(x, y, x_labels, y_labels)``.
    """

    def __init__(
        self,
        distance=None,
        margin=1.0,
        positive_weight=0.5,
        embedding_regularizer=None,
        embedding_reg_weight=1,
        collect_stats=None,
    ):
        super().__init__()
        self.distance = LpDistance(normalize_embeddings=False) if distance is None else distance
        if getattr(self.distance, "is_inverted", False):
            raise ValueError("PairedContrastiveLoss needs a distance, not a similarity (is_inverted=True)")
        self.margin = V.check_number(margin, "margin")
        self.positive_weight = V.check_number(positive_weight, "positive_weight")
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.collect_stats = resolve_collect_stats(collect_stats)

    def pair_distances(self, x, y):
        """``d(x_i, y_i)`` of each listed pair under the loss's distance (raised to its ``power``)."""
        spec = fused_spec(self.distance)
        if spec is not None:
            kind, normalize = spec
            xn = _normalize(x) if normalize else x
            yn = _normalize(y) if normalize else y
            idx = torch.arange(x.shape[0], device=x.device)
            return ops.pair_values(xn, yn, idx, idx, kind)  # (float32 for half precision)
        d = self.distance.pairwise_distance(self.distance.maybe_normalize(x), self.distance.maybe_normalize(y))
        power = getattr(self.distance, "power", 1)
        return d**power if power != 1 else d

    def forward(self, x, y, x_labels, y_labels):
        """The mean over pairs of ``w d^2`` (same label) or ``(1 - w) relu(m - d)^2`` (different labels)."""
        V.check_embeddings(x, "x")
        V.check_ref(x, y, "y")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must have the same number of rows (pairs), got {x.shape[0]} and {y.shape[0]}")
        V.check_labels(x_labels, x.shape[0], "x_labels")
        V.check_labels(y_labels, x.shape[0], "y_labels")
        x_labels = V.move_labels(x_labels, x.device)
        y_labels = V.move_labels(y_labels, x.device)
        equal = x_labels == y_labels
        d = self.pair_distances(x, y)
        w = self.positive_weight
        pos = w * d.square()
        neg = (1 - w) * F.relu(self.margin - d).square()
        terms = torch.where(equal, pos, neg)
        loss = terms.sum()
        if self.collect_stats:
            with torch.no_grad():
                self.num_pos_pairs = int(equal.sum())
                self.num_neg_pairs = int((~equal).sum())
                self.fraction_nonzero = float((terms > 0).float().mean()) if terms.numel() else 0.0
        if self.embedding_regularizer is not None:
            loss = loss + self.embedding_regularizer(torch.cat([x, y])) * self.embedding_reg_weight
        return loss.to(x.dtype)

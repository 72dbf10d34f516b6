"""Losses, drop-in for ``pytorch_metric_learning.losses`` (same names, arguments, defaults and numbers).

Every loss is called as PML's: ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)``, and takes PML's ``distance``, ``reducer``, ``embedding_regularizer``,
``embedding_reg_weight`` and ``collect_stats`` (fastdml's or PML's distance / reducer objects alike).

How a call is computed (fastest first):

1. **Fused** (no N x M matrix, no index list): no ``indices_tuple`` (or the lazy result of a fastdml miner run
   on the same embeddings tensor), a distance with a fused spec (``LpDistance(p=2, power=1|2)``,
   ``CosineSimilarity``, ``DotProductSimilarity``: :func:`fastdml.distances.fused_spec`) and a windowed reducer
   (Mean, Sum, AvgNonZero, Threshold: :func:`fastdml.reducers.reducer_window`). One ``fastdml.ops`` sweep
   returns the sum and count of the counted terms; the loss is ``S / C`` (``S`` for Sum), zero when ``C = 0``.
   BatchHardMiner / BatchEasyHardMiner results are N chosen pairs, evaluated with ``ops.pair_values`` and
   masked (as is :class:`BatchHardTripletLoss`), with no data-dependent shape.
2. **Given indices**: the distances of the listed pairs only, by ``ops.pair_values`` (O(T D), exact), then
   PML's formula per element and the reducer object itself (any reducer).
3. **Generic**: a distance without fused spec (``p != 2``, other powers, subclasses): the distance object's
   own matrix, indexed exactly as PML does.

``swap=True``, an integer ``triplets_per_anchor``, ``DoNothingReducer`` and custom reducers list the
triplets/pairs (through ``ops.triplet_list`` / ``ops.pair_list``) and take path 2 (slower, same numbers).

PML semantics kept: labels are moved to the embeddings' device; ``labels=None`` is accepted with an
``indices_tuple``; the diagonal is excluded iff ``ref_labels is labels`` (``ref_emb=None``, or the caller passing
the same labels object); nothing to compute gives ``(embeddings * 0).sum()``; similarities flip the margins.

Also here: :class:`PairedContrastiveLoss` (a weighted contrastive loss on given pairs) and the one-pass batch losses
PML reaches only through miner + loss: :class:`BatchHardTripletLoss`, :class:`BatchAllTripletLoss`,
:class:`SemiHardTripletLoss`.

Names fastdml does not implement (``NTXentLoss``, ``SupConLoss``, ``ArcFaceLoss``, ``MultipleLosses``, ...)
are PML's own classes when PML is installed.
"""

from .base_metric_loss_function import BaseMetricLossFunction
from .batch_losses import BatchAllTripletLoss, BatchHardTripletLoss, SemiHardTripletLoss
from .contrastive_loss import ContrastiveLoss
from .cross_batch_memory import CrossBatchMemory
from .paired_contrastive_loss import PairedContrastiveLoss
from .triplet_margin_loss import TripletMarginLoss
from .triplet_margin_loss import random_triplets as random_triplets

__all__ = [
    "BaseMetricLossFunction",
    "ContrastiveLoss",
    "TripletMarginLoss",
    "PairedContrastiveLoss",
    "BatchHardTripletLoss",
    "BatchAllTripletLoss",
    "SemiHardTripletLoss",
    "CrossBatchMemory",
]


def __getattr__(name):
    from .._fallback import pml_fallback

    return pml_fallback(__name__, "losses", name, __all__)

"""Functional forms of fastdml's losses and miner selections: thin wrappers of the modules.

Each function builds its module of :mod:`fastdml.losses` or :mod:`fastdml.miners` and calls it once, so it
returns the same number, by the same fused paths and with the same PML semantics (building a module is a few
Python objects; nothing is cached between calls). Options:

* ``distance``: ``"euclidean"`` (``|a - b|``), ``"squared"`` (``|a - b|^2``), ``"cosine"`` (similarity of
  normalized embeddings), ``"dot"`` (``a . b``), or any distance object (fastdml's or PML's);
* ``normalize``: L2-normalize the embeddings first (for ``"euclidean"``, ``"squared"``, ``"dot"``; cosine
  always normalizes). Defaults follow each module (PML's ``True`` for the PML losses, ``False``, plain
  Euclidean, for the TF-Addons style one-pass losses);
* ``reduction``: ``"nonzero"`` (mean of the positive terms, PML's AvgNonZero), ``"mean"``, ``"sum"``,
  ``"none"`` (the per-element terms: a tensor, or ``(pos_terms, neg_terms)`` for the contrastive loss), or a
  reducer object.

Selections: :func:`hardest_pairs` (farthest positive and nearest negative per anchor) and
:func:`easy_hard_pairs` (any of PML's BatchEasyHardMiner strategies) run ``BatchEasyHardMiner`` and return
the chosen pairs with their differentiable distances.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import losses as _losses
from . import miners as _miners
from ._common import Geometry, resolve_inputs
from .distances import CosineSimilarity, DotProductSimilarity, LpDistance
from .reducers import (
    AvgNonZeroReducer,
    DoNothingReducer,
    MeanReducer,
    MultipleReducers,
    SumReducer,
    is_do_nothing,
    is_multiple,
)

__all__ = [
    "contrastive_loss",
    "triplet_margin_loss",
    "paired_contrastive_loss",
    "batch_hard_triplet_loss",
    "batch_all_triplet_loss",
    "semihard_triplet_loss",
    "hardest_pairs",
    "easy_hard_pairs",
    "make_distance",
    "make_reducer",
    "SelectedPairs",
]

DISTANCES = ("euclidean", "squared", "cosine", "dot")
REDUCTIONS = ("nonzero", "mean", "sum", "none")


def make_distance(distance="euclidean", normalize=True):
    """A distance object from a name (see the module docstring); a distance object is returned unchanged."""
    if not isinstance(distance, str):
        return distance
    if distance == "euclidean":
        return LpDistance(normalize_embeddings=normalize)
    if distance == "squared":
        return LpDistance(normalize_embeddings=normalize, power=2)
    if distance == "cosine":
        return CosineSimilarity()
    if distance == "dot":
        return DotProductSimilarity(normalize_embeddings=normalize)
    raise ValueError(f"distance must be one of {DISTANCES} or a distance object, got {distance!r}")


def make_reducer(reduction):
    """A reducer object from a name (see the module docstring); a reducer object is returned unchanged."""
    if not isinstance(reduction, str):
        return reduction
    table = {"nonzero": AvgNonZeroReducer, "mean": MeanReducer, "sum": SumReducer, "none": DoNothingReducer}
    if reduction not in table:
        raise ValueError(f"reduction must be one of {REDUCTIONS} or a reducer object, got {reduction!r}")
    return table[reduction]()


def _with_reducer(mod, reduction):
    """Install the reduction on a freshly built loss without PML's deep copy (``copy.deepcopy`` cannot be traced
    by torch.compile): fresh reducer objects per sub-loss for a name, the given object (shared) otherwise."""
    names = mod._sub_loss_names()
    if isinstance(reduction, str) and reduction == "none":
        mod.reducer = DoNothingReducer()  # the whole loss dict, unreduced
        return mod
    if isinstance(reduction, str):
        reds = {n: make_reducer(reduction) for n in names}
    elif is_multiple(reduction) or is_do_nothing(reduction):
        mod.reducer = reduction
        return mod
    else:
        reds = {n: reduction for n in names}
    mod.reducer = reds[names[0]] if len(names) == 1 else MultipleReducers(reds)
    return mod


def _unwrap(out, names):
    """With reduction "none", the per-element terms from the loss dict."""
    if not isinstance(out, dict):
        return out
    vals = []
    for n in names:
        v = out[n]["losses"]
        vals.append(v if torch.is_tensor(v) else torch.zeros(0))
    return vals[0] if len(vals) == 1 else tuple(vals)


def contrastive_loss(
    embeddings,
    labels=None,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    distance="euclidean",
    normalize=True,
    reduction="nonzero",
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
):
    """PML's contrastive loss: ``reduce(relu(d_ap - pos_margin)) + reduce(relu(neg_margin - d_an))`` over all
    positive / negative pairs (or the given ones); similarities flip the hinges. See
    :class:`fastdml.losses.ContrastiveLoss`."""
    mod = _with_reducer(
        _losses.ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=make_distance(distance, normalize)
        ),
        reduction,
    )
    return _unwrap(mod(embeddings, labels, indices_tuple, ref_emb, ref_labels), ["pos_loss", "neg_loss"])


def triplet_margin_loss(
    embeddings,
    labels=None,
    *,
    margin=0.05,
    swap=False,
    smooth_loss=False,
    triplets_per_anchor="all",
    distance="euclidean",
    normalize=True,
    reduction="nonzero",
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
):
    """PML's triplet margin loss: ``reduce(relu(d_ap - d_an + margin))`` over all triplets (or the given ones).
    See :class:`fastdml.losses.TripletMarginLoss`."""
    mod = _losses.TripletMarginLoss(
        margin=margin,
        swap=swap,
        smooth_loss=smooth_loss,
        triplets_per_anchor=triplets_per_anchor,
        distance=make_distance(distance, normalize),
    )
    mod = _with_reducer(mod, reduction)
    return _unwrap(mod(embeddings, labels, indices_tuple, ref_emb, ref_labels), ["loss"])


def paired_contrastive_loss(
    x, y, x_labels, y_labels, *, margin=1.0, positive_weight=0.5, distance="euclidean", normalize=False
):
    """The paired contrastive loss on pairs (x[t], y[t]): ``sum_t w d_t^2`` (equal labels) ``+ (1 - w) relu(margin -
    d_t)^2`` (different labels). See :class:`fastdml.losses.PairedContrastiveLoss`."""
    mod = _losses.PairedContrastiveLoss(
        distance=make_distance(distance, normalize), margin=margin, positive_weight=positive_weight
    )
    return mod(x, y, x_labels, y_labels)


def batch_hard_triplet_loss(
    embeddings,
    labels,
    *,
    margin=1.0,
    soft=False,
    distance="euclidean",
    normalize=False,
    reduction="mean",
    ref_emb=None,
    ref_labels=None,
):
    """Batch-hard triplet loss (TF-Addons ``triplet_hard_loss``): mean over anchors of
    ``relu(max_p d_ap - min_n d_an + margin)`` (``softplus(max_p d_ap - min_n d_an)`` if ``soft``). See
    :class:`fastdml.losses.BatchHardTripletLoss`."""
    mod = _with_reducer(
        _losses.BatchHardTripletLoss(margin=margin, soft=soft, distance=make_distance(distance, normalize)),
        reduction,
    )
    return _unwrap(mod(embeddings, labels, None, ref_emb, ref_labels), ["loss"])


def batch_all_triplet_loss(
    embeddings,
    labels,
    *,
    margin=0.2,
    distance="euclidean",
    normalize=False,
    reduction="nonzero",
    ref_emb=None,
    ref_labels=None,
):
    """Batch-all triplet loss: ``relu(d_ap - d_an + margin)`` over all valid triplets, averaged over the
    positive terms (``"nonzero"``) or all (``"mean"``). See :class:`fastdml.losses.BatchAllTripletLoss`."""
    mod = _with_reducer(
        _losses.BatchAllTripletLoss(margin=margin, distance=make_distance(distance, normalize)), reduction
    )
    return _unwrap(mod(embeddings, labels, None, ref_emb, ref_labels), ["loss"])


def semihard_triplet_loss(
    embeddings,
    labels,
    *,
    margin=1.0,
    distance="euclidean",
    normalize=False,
    reduction="mean",
    ref_emb=None,
    ref_labels=None,
):
    """FaceNet semi-hard triplet loss (TF-Addons ``triplet_semihard_loss``): mean over positive pairs of
    ``relu(d_ap - d_an* + margin)``. See :class:`fastdml.losses.SemiHardTripletLoss`."""
    mod = _with_reducer(
        _losses.SemiHardTripletLoss(margin=margin, distance=make_distance(distance, normalize)), reduction
    )
    return _unwrap(mod(embeddings, labels, None, ref_emb, ref_labels), ["loss"])


class SelectedPairs(NamedTuple):
    """One positive and one negative per kept anchor: indices, and their distances (raw convention: a
    similarity for similarity distances), differentiable."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    pos_dist: torch.Tensor
    neg_dist: torch.Tensor


def easy_hard_pairs(
    embeddings,
    labels,
    pos_strategy="hard",
    neg_strategy="hard",
    *,
    distance="euclidean",
    normalize=True,
    allowed_pos_range=None,
    allowed_neg_range=None,
    ref_emb=None,
    ref_labels=None,
):
    """PML's BatchEasyHardMiner selection (``pos_strategy``/``neg_strategy`` in hard, semihard, easy; not
    "all"): one pick per anchor (the miner's ``ops.row_extreme``), then the chosen pairs' distances
    (differentiable, O(N D))."""
    for name, s in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
        if s not in ("hard", "semihard", "easy"):
            raise ValueError(f"{name} must be one of ('hard', 'semihard', 'easy'), got {s!r}")
    miner = _miners.BatchEasyHardMiner(
        pos_strategy=pos_strategy,
        neg_strategy=neg_strategy,
        allowed_pos_range=allowed_pos_range,
        allowed_neg_range=allowed_neg_range,
        distance=make_distance(distance, normalize),
    )
    a, p, _, n = miner(embeddings, labels, ref_emb, ref_labels)
    inp = resolve_inputs(embeddings, labels, ref_emb, ref_labels)
    geo = Geometry(miner.distance, inp)
    return SelectedPairs(a, p, n, geo.raw(a, p), geo.raw(a, n))


def hardest_pairs(embeddings, labels, *, distance="euclidean", normalize=True, ref_emb=None, ref_labels=None):
    """Per anchor the farthest positive and the nearest negative (batch-hard), for the anchors that have both.
    See :func:`easy_hard_pairs`."""
    return easy_hard_pairs(
        embeddings,
        labels,
        "hard",
        "hard",
        distance=distance,
        normalize=normalize,
        ref_emb=ref_emb,
        ref_labels=ref_labels,
    )

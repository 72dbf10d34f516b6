"""Loss recipes of the demo: which loss, miner, margin and batch form each ``--loss`` uses.

The loss library is imported here and nowhere else in the demo (``_library``).

Every recipe measures Euclidean distance without normalization (``LpDistance(normalize_embeddings=False)``):
normalized 2-D embeddings live on a circle, where ten classes crowd and batch-hard mining collapsed in a trial.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["LOSSES", "MININGS", "REDUCERS", "DEFAULTS", "Recipe", "build_recipe"]


def _library():
    """The loss library: fastdml's drop-in classes.

    ``FASTDML_DEMO_LIB=pml`` selects pytorch-metric-learning's identical classes instead (a parity check:
    same recipe, same numbers); ``paired-contrastive`` always uses fastdml's ``PairedContrastiveLoss``.
    """
    choice = os.environ.get("FASTDML_DEMO_LIB", "fastdml")
    if choice == "pml":
        from pytorch_metric_learning import distances, losses, miners, reducers
    elif choice == "fastdml":
        from fastdml import distances, losses, miners, reducers
    else:
        raise ValueError(f"FASTDML_DEMO_LIB must be 'fastdml' or 'pml', got {choice!r}")
    return losses, miners, distances, reducers


LOSSES = ("contrastive", "paired-contrastive", "triplet")

# mining choices per loss; the first is the default
MININGS = {
    "contrastive": ("none", "pair-margin", "batch-hard"),
    "paired-contrastive": ("pair-margin", "none"),
    "triplet": ("batch-all", "batch-hard", "semi-hard", "hard"),
}

# How ContrastiveLoss and TripletMarginLoss average their terms: "avg-nonzero" over the terms that are not
# zero (PML's default for both), "mean" over every pair or triplet of the batch.
REDUCERS = ("avg-nonzero", "mean")

# Per-loss defaults: margin, batch layout, schedule, network width, augmentation, chosen on the validation
# split (docs/demo.md). Small rotations and zooms closed most of the gap between training and held-out
# images; the triplet loss also needed a stronger weight decay and 50 images per class. The contrastive
# loss averaged over every pair (mean) kept tighter clusters than over the violating pairs (avg-nonzero).
DEFAULTS = {
    "contrastive": dict(
        mining="none",
        margin=2.0,
        pos_margin=0.5,
        positive_weight=0.5,
        p=10,
        k=25,
        epochs=48,
        lr=3e-3,
        weight_decay=1e-4,
        width=8,
        shift=2,
        rotate=10.0,
        scale=0.1,
        reducer="mean",
    ),
    "paired-contrastive": dict(
        mining="pair-margin",
        margin=2.0,
        pos_margin=0.0,
        positive_weight=0.5,
        p=10,
        k=25,
        epochs=26,
        lr=3e-3,
        weight_decay=1e-4,
        width=16,
        shift=0,
        rotate=10.0,
        scale=0.1,
        reducer=None,
    ),
    "triplet": dict(
        mining="batch-all",
        margin=1.0,
        pos_margin=0.0,
        positive_weight=0.5,
        p=10,
        k=50,
        epochs=52,
        lr=6e-3,
        weight_decay=5e-3,
        width=8,
        shift=1,
        rotate=10.0,
        scale=0.1,
        reducer="avg-nonzero",
    ),
}


@dataclass
class Recipe:
    """A loss callable ``(embeddings, labels) -> scalar`` with the settings that made it."""

    loss: str
    mining: str
    margin: float
    pos_margin: float
    positive_weight: float
    reducer: str | None  # None: the loss averages its own way (paired-contrastive)
    fn: object  # (embeddings, labels) -> loss

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(embeddings, labels)


def _paired_contrastive(losses, distances, margin: float, positive_weight: float):
    """Hadsell et al.'s siamese loss on pairs (i, i + B/2) of a batch of B, averaged over the B/2 pairs."""
    criterion = losses.PairedContrastiveLoss(
        distance=distances.LpDistance(normalize_embeddings=False), margin=margin, positive_weight=positive_weight
    )

    def fn(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        half = len(embeddings) // 2
        x, y = embeddings[:half], embeddings[half : 2 * half]
        # Hadsell et al.'s loss is a sum over pairs; the mean keeps the step size independent of the batch size
        return criterion(x, y, labels[:half], labels[half : 2 * half]) / max(half, 1)

    return fn


def _paired_mined(losses, miners, distances, margin: float, pos_margin: float, positive_weight: float):
    """Hadsell et al.'s loss on the pairs a pair miner picks from a PK batch, averaged over those pairs.

    ``PairMarginMiner(pos_margin, margin)`` keeps the positive pairs farther apart than ``pos_margin`` and
    the negative pairs nearer than ``margin`` (the only negatives with a non-zero term): the mean is over
    the pairs that still have something to learn, so the step does not fade as most pairs are satisfied.
    """
    criterion = losses.PairedContrastiveLoss(
        distance=distances.LpDistance(normalize_embeddings=False), margin=margin, positive_weight=positive_weight
    )
    miner = miners.PairMarginMiner(
        pos_margin=pos_margin, neg_margin=margin, distance=distances.LpDistance(normalize_embeddings=False)
    )

    def fn(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a1, p, a2, n = miner(embeddings, labels)
        first, second = torch.cat([a1, a2]), torch.cat([p, n])
        if len(first) == 0:  # nothing mined: zero, still connected to the graph (NaN stays NaN)
            return (embeddings * 0).sum()
        pairs = criterion(embeddings[first], embeddings[second], labels[first], labels[second])
        return pairs / len(first)

    return fn


def build_recipe(
    loss: str,
    mining: str | None = None,
    margin: float | None = None,
    pos_margin: float | None = None,
    positive_weight: float | None = None,
    reducer: str | None = None,
) -> Recipe:
    """Build the loss callable of ``--loss``/``--mining``/``--margin`` (None: the loss's default).

    - ``contrastive``: ``ContrastiveLoss(pos_margin, neg_margin=margin)`` over all pairs of the batch
      (``mining="none"``), over ``PairMarginMiner(pos_margin, margin)`` pairs, or over the pairs of
      ``BatchHardMiner`` triplets;
    - ``paired-contrastive``: ``PairedContrastiveLoss(margin, positive_weight)`` on the pairs that
      ``PairMarginMiner(pos_margin, margin)`` picks from a PK batch (``pair-margin``), or on the siamese pairs
      (i, i + B/2) of a shuffled batch (``none``);
    - ``triplet``: ``TripletMarginLoss(margin)`` on ``BatchHardMiner`` triplets (``batch-hard``), on
      ``TripletMarginMiner(margin, type)`` triplets (``semi-hard``: "semihard", ``hard``: "hard"), or on every
      triplet of the batch (``batch-all``).

    ``reducer`` (contrastive and triplet): ``"mean"`` averages the terms over every pair (the positive and
    the negative terms separately, then added) or every triplet, ``"avg-nonzero"`` over those with a
    positive term only, so that the few violators left late in training get all the weight.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    d = DEFAULTS[loss]
    mining = d["mining"] if mining is None else mining
    if mining not in MININGS[loss]:
        raise ValueError(f"mining for loss {loss!r} must be one of {MININGS[loss]}, got {mining!r}")
    margin = d["margin"] if margin is None else float(margin)
    pos_margin = d["pos_margin"] if pos_margin is None else float(pos_margin)
    positive_weight = d["positive_weight"] if positive_weight is None else float(positive_weight)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not 0.0 <= positive_weight <= 1.0:
        raise ValueError(f"positive_weight must be in [0, 1], got {positive_weight}")
    if loss == "paired-contrastive":
        if reducer is not None:
            raise ValueError(
                f"reducer applies to the contrastive and triplet losses only, not {loss!r} (it averages over "
                f"its pairs), got {reducer!r}"
            )
    else:
        reducer = d["reducer"] if reducer is None else reducer
        if reducer not in REDUCERS:
            raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")

    losses, miners, distances, reducers = _library()

    def dist():
        return distances.LpDistance(normalize_embeddings=False)

    def reduce():
        return reducers.MeanReducer() if reducer == "mean" else reducers.AvgNonZeroReducer()

    if loss == "paired-contrastive":
        from fastdml import distances as fastdml_distances
        from fastdml import losses as fastdml_losses
        from fastdml import miners as fastdml_miners

        if mining == "none":
            fn = _paired_contrastive(fastdml_losses, fastdml_distances, margin, positive_weight)
        else:
            fn = _paired_mined(fastdml_losses, fastdml_miners, fastdml_distances, margin, pos_margin, positive_weight)
    elif loss == "contrastive":
        criterion = losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=margin, distance=dist(), reducer=reduce())
        miner = {
            "none": None,
            "pair-margin": lambda: miners.PairMarginMiner(pos_margin=pos_margin, neg_margin=margin, distance=dist()),
            "batch-hard": lambda: miners.BatchHardMiner(distance=dist()),
        }[mining]
        fn = _with_miner(criterion, miner() if miner else None)
    else:
        criterion = losses.TripletMarginLoss(margin=margin, distance=dist(), reducer=reduce())
        types = {"semi-hard": "semihard", "hard": "hard"}
        if mining == "batch-hard":
            miner = miners.BatchHardMiner(distance=dist())
        elif mining == "batch-all":
            miner = None
        else:
            miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=types[mining], distance=dist())
        fn = _with_miner(criterion, miner)
    return Recipe(loss, mining, margin, pos_margin, positive_weight, reducer, fn)


def _with_miner(criterion, miner):
    if miner is None:
        return lambda embeddings, labels: criterion(embeddings, labels)

    def fn(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(embeddings, labels, miner(embeddings, labels))

    return fn

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

from .base_miner import BaseMiner, BaseTupleMiner
from .batch_easy_hard_miner import BatchEasyHardMiner, BatchHardMiner
from .multi_similarity_miner import MultiSimilarityMiner
from .pair_margin_miner import PairMarginMiner
from .triplet_margin_miner import TripletMarginMiner

__all__ = [
    "BaseMiner",
    "BaseTupleMiner",
    "TripletMarginMiner",
    "PairMarginMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "MultiSimilarityMiner",
]


def __getattr__(name):
    from .._fallback import pml_fallback

    return pml_fallback(__name__, "miners", name, __all__)

"""PML's ``MultiSimilarityMiner`` (Wang et al. 2019), on the materialized matrix."""

from __future__ import annotations

import torch

from .. import _validation as V
from ..distances import CosineSimilarity
from ..lazy import make_lazy
from .base_miner import BaseMiner


class MultiSimilarityMiner(BaseMiner):
    """PML's ``MultiSimilarityMiner`` (Wang et al. 2019): positive pairs whose similarity is below the hardest
    negative's + epsilon, negative pairs above the hardest positive's - epsilon (distances: mirrored). Computed
    on the materialized matrix, sorting each row as PML does. Default distance: CosineSimilarity."""

    def __init__(self, epsilon=0.1, **kwargs):
        self.epsilon = V.check_number(epsilon, "epsilon")
        super().__init__(**kwargs)

    def get_default_distance(self):
        """PML's hook: the distance used when none is given."""
        return CosineSimilarity()

    def _mine(self, inp):
        geo = self._geometry(inp)
        dev = inp.embeddings.device
        a1, p, a2, n = geo.pair_list()
        if len(a1) == 0 or len(a2) == 0:
            e = torch.zeros(0, dtype=torch.long, device=dev)
            return make_lazy(4, value=(e, e.clone(), e.clone(), e.clone()))
        mat = geo.mat
        inv = geo.inverted
        pos_ignore = float("inf") if inv else float("-inf")
        neg_ignore = float("-inf") if inv else float("inf")
        mat_neg = mat.clone()
        mat_pos = mat.clone()
        mat_pos[a2, n] = pos_ignore
        mat_neg[a1, p] = neg_ignore
        if inp.embeddings is inp.ref_emb:
            mat_pos.fill_diagonal_(pos_ignore)
            mat_neg.fill_diagonal_(neg_ignore)
        pos_sorted, pos_idx = torch.sort(mat_pos, dim=1)
        neg_sorted, neg_idx = torch.sort(mat_neg, dim=1)
        eps = self.epsilon
        if inv:
            hard_pos = torch.where(pos_sorted - eps < neg_sorted[:, -1].unsqueeze(1))
            hard_neg = torch.where(neg_sorted + eps > pos_sorted[:, 0].unsqueeze(1))
        else:
            hard_pos = torch.where(pos_sorted + eps > neg_sorted[:, 0].unsqueeze(1))
            hard_neg = torch.where(neg_sorted - eps < pos_sorted[:, -1].unsqueeze(1))
        ra, rn = hard_pos[0], hard_neg[0]
        return make_lazy(4, value=(ra, pos_idx[ra, hard_pos[1]], rn, neg_idx[rn, hard_neg[1]]))

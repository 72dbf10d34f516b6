"""The memory-bounded blocked PyTorch path (the CPU backend).

Implements the primitive-op contract of ``docs/ARCHITECTURE.md`` over blocks of anchor rows, keeping the
working memory beyond inputs and outputs under ``fastdml.config.memory_budget_bytes()``:

- :func:`contrastive_stats_fwd`, :func:`triplet_stats_fwd`, :func:`semihard_stats_fwd`:
  ``(stats float64, gx_parts (k, N, D), gr_parts (k, M, D))`` with the gradient computed in the forward;
- :func:`row_extreme`, :func:`row_hardest`, :func:`triplet_list`, :func:`pair_list`: mining (no gradient).

Every function runs under ``torch.no_grad()``; the autograd wiring is in :mod:`fastdml.ops`.
"""

from . import contrastive as _contrastive
from . import hardest as _hardest
from . import mining as _mining
from . import triplet as _triplet
from .nonfinite import reference_mining_if_nonfinite, reference_stats_if_nonfinite

# the last positional argument of every stats fwd is need_grad (not an argument of the reference op)
contrastive_stats_fwd = reference_stats_if_nonfinite("contrastive_stats")(_contrastive.contrastive_stats_fwd)
triplet_stats_fwd = reference_stats_if_nonfinite("triplet_stats")(_triplet.triplet_stats_fwd)
semihard_stats_fwd = reference_stats_if_nonfinite("semihard_stats")(_triplet.semihard_stats_fwd)
row_hardest = reference_mining_if_nonfinite("row_hardest")(_hardest.row_hardest)
row_extreme = reference_mining_if_nonfinite("row_extreme")(_mining.row_extreme)
triplet_list = reference_mining_if_nonfinite("triplet_list")(_mining.triplet_list)
pair_list = reference_mining_if_nonfinite("pair_list")(_mining.pair_list)

__all__ = [
    "contrastive_stats_fwd",
    "triplet_stats_fwd",
    "semihard_stats_fwd",
    "row_extreme",
    "row_hardest",
    "triplet_list",
    "pair_list",
]

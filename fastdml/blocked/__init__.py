"""The memory-bounded blocked PyTorch path (the CPU backend).

Implements the primitive-op contract of ``docs/ARCHITECTURE.md`` over blocks of anchor rows, keeping the
working memory beyond inputs and outputs under ``fastdml.config.memory_budget_bytes()``:

- :func:`contrastive_stats_fwd`, :func:`triplet_stats_fwd`, :func:`semihard_stats_fwd`:
  ``(stats float64, gx_parts (k, N, D), gr_parts (k, M, D))`` with the gradient computed in the forward;
- :func:`row_extreme`, :func:`row_hardest`, :func:`triplet_list`, :func:`pair_list`: mining (no gradient).

Every function runs under ``torch.no_grad()``; the autograd wiring is in :mod:`fastdml.ops`.
"""

from . import contrastive as _contrastive
from . import triplet as _triplet
from .hardest import row_hardest
from .mining import pair_list, row_extreme, triplet_list
from .nonfinite import reference_stats_if_nonfinite

# the last positional argument of every stats fwd is need_grad (not an argument of the reference op)
contrastive_stats_fwd = reference_stats_if_nonfinite("contrastive_stats")(_contrastive.contrastive_stats_fwd)
triplet_stats_fwd = reference_stats_if_nonfinite("triplet_stats")(_triplet.triplet_stats_fwd)
semihard_stats_fwd = reference_stats_if_nonfinite("semihard_stats")(_triplet.semihard_stats_fwd)

__all__ = [
    "contrastive_stats_fwd",
    "triplet_stats_fwd",
    "semihard_stats_fwd",
    "row_extreme",
    "row_hardest",
    "triplet_list",
    "pair_list",
]

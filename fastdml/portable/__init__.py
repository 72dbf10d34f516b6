"""Device-independent torch code: ops whose one implementation serves every device.

- :func:`pair_values` / :func:`pair_values_backward`: ``d'`` of listed pairs, O(T D);
- :func:`chosen_triplet_stats_fwd`: the loss of one chosen triplet per anchor with its gradient, O(N D);
- :func:`acc_dtype`, :func:`add_rows`: helpers the backends share.

Every function runs without autograd; the wiring is in :mod:`fastdml.ops`, the routing in :mod:`fastdml.dispatch`.
"""

from ..blocked.nonfinite import reference_chosen_if_nonfinite
from .chosen import chosen_triplet_stats_fwd as _chosen_triplet_stats_fwd
from .pairs import pair_values, pair_values_backward
from .rows import acc_dtype, add_rows

# NaN, inf or overflowing rows: the reference's values (PML's rule), also inside compiled graphs
chosen_triplet_stats_fwd = reference_chosen_if_nonfinite(_chosen_triplet_stats_fwd)

__all__ = ["chosen_triplet_stats_fwd", "pair_values", "pair_values_backward", "acc_dtype", "add_rows"]

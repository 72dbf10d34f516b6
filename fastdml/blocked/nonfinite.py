"""Non-finite (or overflowing) inputs: the stats follow the reference's NaN rules exactly.

The blocked path turns each reducer window into an interval on d' and sums with multiplicative masks, which is
exact for finite inputs but not for NaN (``NaN * 0`` is NaN; a NaN distance fails every interval). PML's rules
for a NaN term are: an infinite bound imposes no condition (a plain mean propagates NaN), a finite bound is a
strict comparison that NaN fails (AvgNonZero/Threshold drop it). Inputs with a NaN or an infinity are a rare
edge case, so for them the sums and counts come from :mod:`fastdml.reference` (which materializes the N x M
matrix: O(N M) memory, documented) while the gradient parts still come from the blocked sweep. The check
(``fastdml._nanrule.extreme``: a row norm that is NaN, infinite or large enough to overflow a distance) is one
O(N D) pass, negligible beside the O(N M D) sweep. Eager calls reach the reference before this point
(``fastdml.ops``); this wrapper serves compiled graphs, which cannot branch on data before the op.
"""

from __future__ import annotations

import functools

import torch


def reference_stats_if_nonfinite(op_name: str):
    """Wrap a blocked ``*_fwd`` so that non-finite inputs get the reference's stats (values and counts)."""

    def wrap(fwd):
        @functools.wraps(fwd)
        def wrapped(x, y, r, z, excl, kind, *args, **kwargs):
            # args end with need_grad (not an argument of the reference op); kwargs: need_grad_r
            stats, gx, gr = fwd(x, y, r, z, excl, kind, *args, **kwargs)
            from .. import _nanrule, reference

            if not _nanrule.extreme(x, r):
                return stats, gx, gr

            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            with torch.no_grad():
                ref = getattr(reference, op_name)(
                    x.detach().to(acc), y, None if r is None else r.detach().to(acc), z, excl, kind, *args[:-1]
                )
            return ref.to(stats.dtype), gx, gr

        return wrapped

    return wrap

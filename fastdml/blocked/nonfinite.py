"""Non-finite (or overflowing) inputs: the blocked ops return the reference's results exactly.

The blocked path turns each reducer window into an interval on d' and sums with multiplicative masks, which is
exact for finite inputs but not for NaN (``NaN * 0`` is NaN; a NaN distance fails every interval). Inputs with
a row that is NaN, infinite or large enough to overflow a distance are a rare edge case, so for them every
blocked op (stats with their gradient parts, and mining) returns what :mod:`fastdml.reference` gives, which
follows PML's comparisons and arithmetic (it materializes the N x M matrix: O(N M) memory, documented). The
check (``fastdml._nanrule.extreme``) is one O(N D) pass, negligible beside the O(N M D) sweep. Eager calls
reach the reference before this point (``fastdml.ops``); these wrappers serve compiled graphs, which cannot
branch on data before the op.
"""

from __future__ import annotations

import functools

import torch

# the sum slots of each stats op's output (the gradient parts follow them, in order)
_SUM_SLOTS = {"contrastive_stats": (0, 2), "triplet_stats": (0,), "semihard_stats": (0,), "chosen_triplet_stats": (0,)}


def _acc(t):
    if t is None:
        return None
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _reference_stats(op_name, x, r, call, need_grad, need_grad_r):
    """``(stats, gx_parts, gr_parts)`` of reference op ``op_name`` by plain autograd, in the blocked layout."""
    from .. import reference

    slots = _SUM_SLOTS[op_name]
    with torch.enable_grad():
        xa = _acc(x).requires_grad_(need_grad)
        ra = None if r is None else _acc(r).requires_grad_(need_grad and need_grad_r)
        stats = call(getattr(reference, op_name), xa, ra)
        k = len(slots) if need_grad else 0
        gx = torch.zeros((k, *x.shape), dtype=xa.dtype, device=x.device)
        kr = k if (r is not None and need_grad_r) else 0
        gr = torch.zeros((kr, *(r.shape if r is not None else (0, x.shape[1]))), dtype=xa.dtype, device=x.device)
        if need_grad:
            wrt = [t for t in (xa, ra) if t is not None and t.requires_grad]
            for i, slot in enumerate(slots):
                if not stats[slot].requires_grad:
                    continue
                grads = torch.autograd.grad(stats[slot], wrt, retain_graph=True, allow_unused=True)
                if grads[0] is not None:
                    gx[i] = grads[0]
                if kr and grads[-1] is not None:
                    gr[i] = grads[-1]
    return stats.detach().to(torch.float64), gx, gr


def reference_stats_if_nonfinite(op_name: str):
    """Wrap a blocked ``*_fwd(x, y, r, z, excl, kind, *params, need_grad, need_grad_r=...)`` so that extreme
    inputs get the reference's stats and gradient parts."""

    def wrap(fwd):
        @functools.wraps(fwd)
        def wrapped(x, y, r, z, excl, kind, *args, need_grad_r=True):
            from .. import dispatch

            if not dispatch.stats_from_reference(x, r):
                return fwd(x, y, r, z, excl, kind, *args, need_grad_r=need_grad_r)
            params, need_grad = args[:-1], bool(args[-1])
            return _reference_stats(
                op_name, x, r, lambda f, xa, ra: f(xa, y, ra, z, excl, kind, *params), need_grad, need_grad_r
            )

        return wrapped

    return wrap


def reference_chosen_if_nonfinite(fwd):
    """The same for ``chosen_triplet_stats_fwd(x, valid, r, p, n, kind, *params, need_grad, need_grad_r)``."""

    @functools.wraps(fwd)
    def wrapped(x, valid, r, p, n, kind, *args, need_grad_r=True):
        from .. import dispatch

        if not dispatch.stats_from_reference(x, r):
            return fwd(x, valid, r, p, n, kind, *args, need_grad_r=need_grad_r)
        params, need_grad = args[:-1], bool(args[-1])
        return _reference_stats(
            "chosen_triplet_stats",
            x,
            r,
            lambda f, xa, ra: f(xa, valid, ra, p, n, kind, *params),
            need_grad,
            need_grad_r,
        )

    return wrapped


def reference_mining_if_nonfinite(op_name: str):
    """Wrap a blocked mining op ``(x, y, r, z, excl, kind, ...)`` so that extreme inputs get the reference's
    result (PML's comparisons with NaN)."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(x, y, r, z, excl, kind, *args):
            from .. import dispatch, reference

            if not dispatch.stats_from_reference(x, r):
                return fn(x, y, r, z, excl, kind, *args)
            with torch.no_grad():
                return getattr(reference, op_name)(x, y, r, z, excl, kind, *args)

        return wrapped

    return wrap

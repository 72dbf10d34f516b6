"""The pool context: how a loss sees "these queries against that reference pool" without knowing it.

Two wrappers evaluate a loss on queries ``x`` (N, D) against a reference pool ``r`` (M, D) that contains the
queries themselves somewhere: :class:`fastdml.utils.distributed.DistributedLossWrapper` (local anchors against
the all-gathered batch of every rank) and :class:`fastdml.cross_batch_memory.CrossBatchMemory` (the batch
against the memory queue it was just written into). In both, query ``i`` must not be compared with its own
copy ``r[excl[i]]`` (PML's ``remove_self_comparisons``), and in the distributed case the loss's sums and
counts are sums over the anchors of *every* rank.

Instead of listing pairs, the wrapper enters :func:`pool_context` and calls the loss as
``loss(x, labels, None, r, ref_labels)``. Two hooks consult the context:

* :func:`resolve_excl` (in :mod:`fastdml.ops`): a rectangular op (``r`` given, ``excl=None``) whose shapes are
  the context's ``(N, M)`` gets the context's per-query exclusion ``excl``;
* :func:`reduce_stats` (in :mod:`fastdml.ops`, on the float64 ``[S..., C...]`` of the stats ops) and
  :func:`reduce_terms` (the reducer the distributed wrapper installs for the per-element path: batch-hard,
  explicit index tuples), and :func:`reduce_sum_count` (in the losses that sum their own terms in PyTorch:
  batch-hard) all-reduce the sums and counts over the process group. With ``s`` this rank's sums
  and ``s_all`` their all-reduced total::

      s_global = s + (s_all - s).detach()

  so the value is the global sum on every rank while the gradient flows through this rank's sums only; the
  loss built from them (``S / C``) is the loss of one process on the concatenated batch, and its gradient is
  this rank's share of the global gradient.

The context is a plain module-level stack (not thread-local) so that ``torch.compile`` can trace its reads;
the wrappers enter and leave it in the thread that runs the loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "PoolContext",
    "pool_context",
    "current",
    "resolve_excl",
    "reduce_stats",
    "reduce_terms",
    "reduce_sum_count",
    "active",
    "reducing",
]


@dataclass
class PoolContext:
    """One active pool: queries of ``n_query`` rows against references of ``n_ref`` rows.

    ``excl`` (n_query,) int64 or None: the reference index each query skips (-1: none).
    ``group``: the process group whose ranks' sums and counts are added (``reduce=True``), or None.
    """

    n_query: int
    n_ref: int
    excl: Optional[Tensor] = None
    reduce: bool = False
    group: object = None
    applied: int = 0  # how many rectangular ops took the exclusion (tests, sanity checks)
    reduced: int = 0  # how many sums/counts were added over the ranks (a loss that added none bypassed the hooks)


_STACK: list[PoolContext] = []


@contextlib.contextmanager
def pool_context(n_query: int, n_ref: int, excl: Optional[Tensor] = None, reduce: bool = False, group=None):
    """Activate a pool for the ops and reducers called inside the ``with`` block (innermost wins)."""
    if excl is not None and (excl.ndim != 1 or excl.shape[0] != n_query):
        raise ValueError(f"pool_context: excl must have shape ({n_query},), got {tuple(excl.shape)}")
    # (sizes kept as given: under torch.compile they may be symbolic, and int() would specialize the graph)
    ctx = PoolContext(n_query, n_ref, None if excl is None else excl.to(torch.int64), reduce, group)
    _STACK.append(ctx)
    try:
        yield ctx
    finally:
        _STACK.pop()


def current() -> Optional[PoolContext]:
    """The innermost active pool, or None."""
    return _STACK[-1] if _STACK else None


def active() -> bool:
    return bool(_STACK)


def reducing() -> bool:
    """True inside a context whose sums and counts are added over the ranks (every rank must then make the same
    collective calls, whatever its local shapes)."""
    return bool(_STACK) and _STACK[-1].reduce


def resolve_excl(x: Tensor, r: Optional[Tensor], excl: Optional[Tensor], count: bool = True) -> Optional[Tensor]:
    """``excl`` for a rectangular op: the context's exclusion when the op is ``(n_query, n_ref)``, none given.

    ``count=False``: a look-up that is not an op taking the exclusion (``PoolContext.applied`` unchanged)."""
    if not _STACK or r is None or excl is not None:
        return excl
    ctx = _STACK[-1]
    if ctx.excl is None or x.shape[0] != ctx.n_query or r.shape[0] != ctx.n_ref:
        return excl
    if count:
        ctx.applied += 1
    return ctx.excl if ctx.excl.device == x.device else ctx.excl.to(x.device)


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    """Sum of ``t`` over the ranks of ``group`` (a new tensor; ``t`` is not modified)."""
    import torch.distributed as dist

    if torch.compiler.is_compiling():
        # functional collectives are traceable; the in-place c10d call is not
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, "sum", group if group is not None else dist.group.WORLD)
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_stats(stats: Tensor) -> Tensor:
    """Sums and counts of a stats op, added over the context's ranks (value global, gradient local)."""
    if not _STACK or not _STACK[-1].reduce:
        return stats
    ctx = _STACK[-1]
    ctx.reduced += 1
    local = stats.detach()
    total = _all_reduce_sum(local, ctx.group)
    return stats + (total - local)


def reduce_sum_count(s: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """A loss's own sum and count of counted terms (float64 0-dim tensors, e.g. batch-hard's per-anchor terms
    summed in PyTorch), added over the context's ranks (value global, gradient local); unchanged outside a
    reducing context. Every rank must call it: it is a collective."""
    if not _STACK or not _STACK[-1].reduce:
        return s, c
    both = reduce_stats(torch.stack([s.to(torch.float64), c.to(torch.float64)]))
    return both[0], both[1]


def reduce_terms(losses, low: float, high: float, divide: bool, embeddings: Tensor) -> Tensor:
    """The windowed reduction of per-element terms over every rank of the context.

    A term ``t`` is counted iff ``low < t < high`` (an infinite bound imposes nothing, so NaN passes it, as in
    ``torch.mean``); ``S`` = sum of counted terms, ``C`` = their number, both added over the ranks; the value is
    ``S / C`` (``divide``) or ``S``, and ``(embeddings * 0).sum()`` when the global ``C`` is 0. Every rank must
    call this (also with no local terms: ``losses`` may be the int 0 PML uses for "nothing"), since it is a
    collective.
    """
    ctx = _STACK[-1]
    if not torch.is_tensor(losses):
        losses = embeddings.new_zeros((0,))
    losses = losses.reshape(-1)
    keep = torch.ones_like(losses, dtype=torch.bool)
    if low != -math.inf:
        keep = keep & (losses > low)
    if high != math.inf:
        keep = keep & (losses < high)
    terms = torch.where(keep, losses, torch.zeros_like(losses))
    local = torch.stack([terms.to(torch.float64).sum(), keep.sum().to(torch.float64)])
    if ctx.reduce:
        ctx.reduced += 1
        total = _all_reduce_sum(local.detach(), ctx.group)
        local = local + (total - local.detach())
    s, c = local[0], local[1]
    zero = torch.sum(embeddings * 0)
    if divide:
        # C = 0: zero with zero gradient, attached (the where() keeps 0/0 out of the value and the gradient)
        value = torch.where(c > 0, s / torch.clamp(c, min=1.0), torch.zeros_like(s))
    else:
        value = s
    # half-precision embeddings: float32 until the loss rounds once at the end (as fastdml's losses do)
    out_dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
    return value.to(out_dtype) + zero

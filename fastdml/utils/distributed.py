"""Multi-process losses and miners: PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper`` on
``torch.distributed`` (NCCL on GPUs, gloo on the CPU), exact.

Each of the W ranks holds a local batch ``x_q`` (n_q rows, sizes may differ). The wrappers all-gather the
embeddings and labels into the **pool**, in PML's order: this rank's rows first, then the other ranks' rows
in rank order (so index tuples mean what they mean in PML). With ``L`` the loss of one process on the
concatenated batch:

* ``efficient=False`` (PML's default): every rank evaluates the loss on the whole pool, its own rows
  differentiable and the others' detached, and returns ``L + (W - 1) (L - L.detach())``: the value is
  ``L`` and the gradient is ``W dL/dx_q``, so that after DDP's averaging of the parameter gradients
  (``1/W sum_q``) they are exactly those of one process. (PML returns the value ``W L``.) Exact for any loss.
* ``efficient=True``: each rank evaluates only its own anchors against the pool: ``loss(x_q, y_q, None,
  pool, pool_labels)`` inside a :func:`fastdml._context.pool_context` that gives the rectangular ops the
  per-query exclusion (``excl[i] = i``: anchor i's own row in the pool, PML's ``remove_self_comparisons``)
  and adds the loss's sums and counts over the ranks (``S = sum_q S_q``, ``C = sum_q C_q``, value
  global, gradient local). The pool is gathered with autograd (the backward all-reduces the pool's gradient
  and each rank keeps its own rows), so rank q's gradient is ``dL/dx_q`` in full; returned as
  ``L + (W - 1)(L - L.detach())`` for DDP's averaging. Work per rank: ``n_q x M`` instead of ``M x M``. The
  losses whose value is a ratio of sums over anchors (contrastive, triplet: all, batch-hard, semi-hard,
  explicit index tuples) take this path; any other loss, or a loss that does not run on the fused
  rectangular ops (another distance), is computed as with ``efficient=False`` (exact, never PML's
  rank-local normalisers).

A wrapped :class:`~fastdml.cross_batch_memory.CrossBatchMemory` (``efficient=False`` only, as PML) gets the pool
in plain rank order instead, so that every rank writes the same rows in the same order into its memory: the
memories stay identical (PML's per-rank order lets them diverge once the ring wraps) and equal to one process's
fed the concatenated batches; its ``indices_tuple`` indexes that rank-ordered pool.

Uneven batches: the sizes are all-gathered first, every rank pads to the largest and the padding is dropped.

``torch.compile``: under tracing the pool is gathered with functional collectives
(``all_gather_tensor_autograd``, whose backward is a reduce-scatter; the stats' all-reduce likewise), which
needs the same batch size on every rank (checked by a runtime assertion): the sizes of an uneven gather
are data. With a traceable loss the wrapper compiles with ``fullgraph=True`` (tests/test_distributed_compile.py:
fastdml's ContrastiveLoss with ``efficient=False`` and ``efficient=True``, and a loss written on the ops with
either mode): the rectangular path decides PML's "at most one pair" rule without a host sync (the pair counts
follow from the labels, added over the ranks).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _context
from ..reducers import MultipleReducers, reducer_window

__all__ = [
    "is_distributed",
    "all_gather_pool",
    "DistributedLossWrapper",
    "DistributedMinerWrapper",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_world(group) -> tuple[int, int]:
    dist = torch.distributed
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _pool_order(rank: int, world: int, rank_order: bool = False) -> list[int]:
    """PML's pool order: this rank first, then the others in rank order (``rank_order``: plain rank order)."""
    if rank_order:
        return list(range(world))
    return [rank] + [q for q in range(world) if q != rank]


def gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's row count, in rank order."""
    dist = torch.distributed
    _, world = _rank_world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _gather_padded(t: Tensor, sizes: list[int], group) -> list[Tensor]:
    """All ranks' ``t`` (rows ``sizes[q]``), padded to the largest for the collective; no autograd."""
    dist = torch.distributed
    nmax = max(sizes)
    t = t.detach()
    as_bool = t.dtype == torch.bool  # gloo has no bool collectives
    if as_bool:
        t = t.to(torch.uint8)
    if t.shape[0] < nmax:
        pad = t.new_zeros((nmax - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], 0)
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(out, t, group=group)
    out = [o[:n] for o, n in zip(out, sizes)]
    return [o.to(torch.bool) for o in out] if as_bool else out


class _AllGatherPool(torch.autograd.Function):
    """Pool (PML order) of every rank's rows; backward: the pool gradient summed over ranks, own rows kept."""

    @staticmethod
    def forward(ctx, x, sizes, group, rank_order):
        rank, world = _rank_world(group)
        parts = _gather_padded(x, sizes, group)
        order = _pool_order(rank, world, rank_order)
        ctx.sizes, ctx.group, ctx.order, ctx.rank = sizes, group, order, rank
        parts[rank] = x.detach()  # bitwise the same; keeps the local values exact
        return torch.cat([parts[q] for q in order], 0)

    @staticmethod
    def backward(ctx, grad):
        dist = torch.distributed
        sizes, order = ctx.sizes, ctx.order
        nmax = max(sizes)
        padded = grad.new_zeros((len(sizes), nmax) + tuple(grad.shape[1:]))
        start = 0
        for q in order:
            padded[q, : sizes[q]] = grad[start : start + sizes[q]]
            start += sizes[q]
        # every rank's loss put gradient on every pool row: the owner's gradient is the sum over ranks
        dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
        return padded[ctx.rank, : sizes[ctx.rank]].clone(), None, None, None


def all_gather_pool(
    x: Tensor, group=None, grad: str = "all", sizes: Optional[list[int]] = None, rank_order: bool = False
):
    """The pool of every rank's ``x`` in PML's order (this rank first, then the others by rank).

    ``grad="all"``: differentiable, the backward sends each rank the sum over ranks of its rows' gradient;
    ``"own"``: this rank's rows differentiable, the others detached (no collective in the backward);
    ``"none"``: detached. ``rank_order=True``: the pool in plain rank order (the same on every rank) instead.
    Returns ``(pool, sizes)`` with ``sizes`` every rank's row count in rank order.
    """
    if torch.compiler.is_compiling():
        return _all_gather_pool_traced(x, group, grad, rank_order)
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    rank, world = _rank_world(group)
    if grad == "all" and x.requires_grad and torch.is_grad_enabled():
        return _AllGatherPool.apply(x, sizes, group, rank_order), sizes
    parts = _gather_padded(x, sizes, group)
    parts[rank] = x if grad == "own" else x.detach()
    return torch.cat([parts[q] for q in _pool_order(rank, world, rank_order)], 0), sizes


def _all_gather_pool_traced(x: Tensor, group, grad: str, rank_order: bool):
    """The pool under ``torch.compile``: functional collectives (traceable, and differentiable for ``"all"``:
    the backward is a reduce-scatter, i.e. the sum over ranks of each rank's rows). Sizes must be equal on
    every rank here (a data-dependent size cannot be traced); a runtime assertion checks it."""
    from torch.distributed import _functional_collectives as funcol

    dist = torch.distributed
    grp = group if group is not None else dist.group.WORLD
    rank, world = _rank_world(group)
    n = x.shape[0]
    mine = torch.full((1,), n, dtype=torch.int64, device=x.device)
    torch._assert_async(
        (funcol.all_gather_tensor(mine, 0, grp) == n).all(),
        "DistributedLossWrapper under torch.compile needs the same batch size on every rank",
    )
    if grad == "all" and x.requires_grad:
        full = funcol.all_gather_tensor_autograd(x, 0, grp)
    else:
        full = funcol.all_gather_tensor(x.detach(), 0, grp)
    parts = [full[q * n : (q + 1) * n] for q in range(world)]
    if grad == "own":
        parts[rank] = x
    return torch.cat([parts[q] for q in _pool_order(rank, world, rank_order)], 0), [n] * world


def _gather_labels(labels: Optional[Tensor], sizes: list[int], group, rank_order: bool = False) -> Optional[Tensor]:
    if labels is None:
        return None
    rank, world = _rank_world(group)
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        n = labels.shape[0]
        grp = group if group is not None else torch.distributed.group.WORLD
        full = funcol.all_gather_tensor(labels, 0, grp)
        parts = [full[q * n : (q + 1) * n] for q in range(world)]
        parts[rank] = labels
        return torch.cat([parts[q] for q in _pool_order(rank, world, rank_order)], 0)
    parts = _gather_padded(labels, sizes, group)
    parts[rank] = labels
    return torch.cat([parts[q] for q in _pool_order(rank, world, rank_order)], 0)


class _AttachToPool(torch.autograd.Function):
    """``loss`` unchanged, with a zero gradient for ``pool``: the gathered pool is then in every rank's graph, so
    every rank runs the gather's backward collective, also a rank whose loss did not use the pool (an empty
    batch, no triplets: PML's zero loss attaches to the local embeddings only), which would otherwise hang the
    others. (A zero tensor, not ``pool * 0``: no NaN from an infinite entry.)"""

    @staticmethod
    def forward(ctx, loss, pool):
        ctx.pool_shape, ctx.pool_dtype, ctx.pool_device = pool.shape, pool.dtype, pool.device
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.pool_shape, dtype=ctx.pool_dtype, device=ctx.pool_device)


def _scale_grad(loss: Tensor, world: int) -> Tensor:
    """Value ``loss``, gradient ``world * dloss`` (exactly: ``loss - loss.detach()`` is 0)."""
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return loss
    return loss + (world - 1) * (loss - loss.detach())


def _is_cross_batch(loss) -> bool:
    from ..cross_batch_memory import CrossBatchMemory

    if isinstance(loss, CrossBatchMemory):
        return True
    try:
        from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory
    except ImportError:
        return False
    return isinstance(loss, PMLCrossBatchMemory)


# fastdml losses whose value is built from sums and counts over anchors (they add over ranks)
_POOL_LOSSES = (
    "ContrastiveLoss",
    "TripletMarginLoss",
    "BatchHardTripletLoss",
    "BatchAllTripletLoss",
    "SemiHardTripletLoss",
)


def _supports_pool(loss) -> bool:
    """True when the rank-local evaluation with summed sums and counts is exactly the global loss."""
    if not type(loss).__module__.startswith("fastdml.losses.") or type(loss).__name__ not in _POOL_LOSSES:
        return False
    if not loss._fusable():
        return False  # a subclass overriding a PML hook runs PML's general path
    if getattr(loss, "embedding_regularizer", None) is not None:
        return False  # a mean over this rank's embeddings, already reduced: not a global sum
    if getattr(loss, "swap", False) or getattr(loss, "triplets_per_anchor", "all") != "all":
        return False  # swap indexes the pool by positives; random triplets are drawn per process
    return all(reducer_window(loss.sub_reducer(name)) is not None for name in loss.sub_loss_names())


class _RankSumReducers(MultipleReducers):
    """The reducer the efficient wrapper installs on the loss during the call: per-element reductions add their
    sums and counts over the ranks (:func:`fastdml._context.reduce_terms`); the fused values (``already_reduced``
    tensors) are global already (the ops' stats were added). It holds the loss's own sub-reducers, so the loss
    still finds its reducers' windows (and takes its fused path). Sub-losses are added, as MultipleReducers."""

    def forward(self, loss_dict, embeddings, labels):
        values = []
        # half-precision embeddings: float32 until the loss rounds once at the end (as fastdml's losses do)
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        for name, info in loss_dict.items():
            losses, kind = info["losses"], info["reduction_type"]
            if kind == "already_reduced" and torch.is_tensor(losses):
                values.append(losses.reshape(()).to(dtype))
                continue
            # per-element terms, or PML's int 0 for "no terms on this rank": every rank takes part
            low, high, divide = reducer_window(self.reducer_for(name))
            values.append(_context.reduce_terms(losses, low, high, divide, embeddings).to(dtype))
        return torch.stack(values).sum()


def _rank_sum_reducers(loss) -> _RankSumReducers:
    return _RankSumReducers({name: loss.sub_reducer(name) for name in loss.sub_loss_names()})


def _check_loss(loss) -> None:
    if isinstance(loss, torch.nn.Module) and callable(loss):
        return
    raise TypeError(f"loss must be a loss module (fastdml's or PML's), got {type(loss).__name__}")


def _move(labels, device):
    if labels is None or not torch.is_tensor(labels):
        return labels
    return labels if labels.device == device else labels.to(device)


def _remove_self(indices_tuple, n: int):
    """Drop the pairs/triplets whose reference is the anchor's own pool row (rows 0..n-1 are this rank's)."""
    if len(indices_tuple) == 3:
        a, p, neg = indices_tuple
        keep = a != p
        return a[keep], p[keep], neg[keep]
    a1, p, a2, neg = indices_tuple
    keep = a1 != p
    return a1[keep], p[keep], a2, neg


class DistributedLossWrapper(torch.nn.Module):
    """``DistributedLossWrapper(loss, efficient=False)``: the loss of one process on the concatenated batch of
    every rank (see the module docstring for the math and for how it differs from PML's value ``W L``).

    Call as PML: ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
    enqueue_mask=None)`` (``enqueue_mask`` only with a :class:`~fastdml.cross_batch_memory.CrossBatchMemory`).
    ``indices_tuple`` indexes the pool (efficient=False) or local anchors and pool references (efficient=True),
    as PML. Outside ``torch.distributed`` (or with one rank) the loss is called as is.
    """

    def __init__(self, loss, efficient: bool = False, group=None):
        super().__init__()
        _check_loss(loss)
        if _is_cross_batch(loss) and efficient:
            raise ValueError("CrossBatchMemory with efficient=True is not supported (as in PML)")
        self.loss = loss
        self.efficient = bool(efficient)
        self.group = group

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        """The wrapped loss on the batch gathered from every process (see the class docstring)."""
        cross_batch = _is_cross_batch(self.loss)
        if not is_distributed():
            warnings.warn(
                "DistributedLossWrapper is being used in a non-distributed setting. Returning the loss as is.",
                stacklevel=2,
            )
            if cross_batch:
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
            raise ValueError(
                f"embeddings must be a 2-D tensor (N, D), got {getattr(embeddings, 'shape', type(embeddings))}"
            )
        rank, world = _rank_world(self.group)
        labels = _move(labels, embeddings.device)
        if cross_batch:
            return self._forward_cross_batch(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, world
            )
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is only accepted when the wrapped loss is a CrossBatchMemory")
        if world <= 1:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.efficient and _supports_pool(self.loss):
            out = self._forward_pool(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if out is not None:
                return _scale_grad(out, world)
        return _scale_grad(self._forward_full(embeddings, labels, indices_tuple, ref_emb, ref_labels), world)

    def _forward_full(self, emb, labels, indices_tuple, ref_emb, ref_labels):
        """The loss on the whole pool: own rows differentiable, the others detached."""
        pool, sizes = all_gather_pool(emb, self.group, grad="own")
        pool_labels = _gather_labels(labels, sizes, self.group)
        ref_pool = ref_pool_labels = None
        if ref_emb is not None:
            ref_pool, rsizes = all_gather_pool(ref_emb, self.group, grad="own")
            ref_pool_labels = _gather_labels(_move(ref_labels, emb.device), rsizes, self.group)
        return self.loss(pool, pool_labels, indices_tuple, ref_pool, ref_pool_labels)

    def _forward_pool(self, emb, labels, indices_tuple, ref_emb, ref_labels):
        """This rank's anchors against the pool, sums and counts added over the ranks; None: not on the ops."""
        n = emb.shape[0]
        if ref_emb is None:
            refs, sizes = all_gather_pool(emb, self.group, grad="all")
            ref_lab = _gather_labels(labels, sizes, self.group)
        else:
            refs, sizes = all_gather_pool(ref_emb, self.group, grad="all")
            ref_lab = _gather_labels(_move(ref_labels, emb.device), sizes, self.group)
        # anchor i skips pool row i (this rank's rows come first): PML's get_indices_tuple removes these
        # "self comparisons", also when ref_emb is given
        excl = torch.arange(n, device=emb.device) if indices_tuple is None else None
        original = self.loss.reducer
        self.loss.reducer = _rank_sum_reducers(self.loss)
        try:
            with _context.pool_context(n, refs.shape[0], excl, reduce=True, group=self.group) as ctx:
                loss = self.loss(emb, labels, indices_tuple, refs, ref_lab)
        finally:
            self.loss.reducer = original
        if torch.is_tensor(loss) and refs.requires_grad and torch.is_grad_enabled():
            loss = _AttachToPool.apply(loss, refs)
        if ctx.reduced == 0:
            # no sum or count went through the hooks (a loss path that sums its terms itself): the value is this
            # rank's alone; every rank took the same path, so every rank recomputes on the whole pool
            warnings.warn(
                f"DistributedLossWrapper(efficient=True): {type(self.loss).__name__} summed its terms outside the "
                "fused ops and reducers (no fused rectangular path with rank sums); computing the loss on the "
                "whole pool instead",
                stacklevel=2,
            )
            return None
        if excl is not None and ctx.applied == 0:
            # the loss did not run on the rectangular ops (e.g. a distance without a fused path), so it
            # compared anchors with their own rows: every rank took the same code path, so every rank
            # recomputes on the whole pool (the collectives above matched; the result is discarded)
            warnings.warn(
                f"DistributedLossWrapper(efficient=True): {type(self.loss).__name__} with this configuration "
                "has no fused rectangular path; computing the loss on the whole pool instead",
                stacklevel=2,
            )
            return None
        return loss

    def _forward_cross_batch(self, emb, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask, world):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
        if world <= 1:
            return self.loss(emb, labels, indices_tuple, enqueue_mask)
        # plain rank order here (not PML's "own rows first"): every rank then writes the same rows in the same
        # order into its memory, so the memories stay identical and equal one process's (PML's order makes the
        # ranks' rings hold different rows once they wrap)
        pool, sizes = all_gather_pool(emb, self.group, grad="own", rank_order=True)
        pool_labels = _gather_labels(labels, sizes, self.group, rank_order=True)
        if enqueue_mask is not None:
            enqueue_mask = _gather_labels(_move(enqueue_mask, emb.device), sizes, self.group, rank_order=True)
        return _scale_grad(self.loss(pool, pool_labels, indices_tuple, enqueue_mask), world)


class DistributedMinerWrapper(torch.nn.Module):
    """``DistributedMinerWrapper(miner, efficient=False)``: the miner on every rank's batch, as PML.

    ``efficient=False``: the miner runs on the pool (PML's order: this rank's rows first), indices into the
    pool. ``efficient=True``: this rank's rows are the anchors and the pool the references (the tuple's
    anchors index the local batch, the rest the pool), self comparisons removed (with fastdml's miners the
    rectangular ops skip them; the filter is kept for any other miner). Feed the result to a
    :class:`DistributedLossWrapper` with the same ``efficient``.
    """

    def __init__(self, miner, efficient: bool = False, group=None):
        super().__init__()
        if not (isinstance(miner, torch.nn.Module) and callable(miner)):
            raise TypeError(f"miner must be a miner module (fastdml's or PML's), got {type(miner).__name__}")
        self.miner = miner
        self.efficient = bool(efficient)
        self.group = group

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        """The wrapped miner's result on the batch gathered from every process (see the class docstring)."""
        if not is_distributed():
            return self.miner(emb, labels, ref_emb, ref_labels)
        _, world = _rank_world(self.group)
        if world <= 1:
            return self.miner(emb, labels, ref_emb, ref_labels)
        labels = _move(labels, emb.device)
        with torch.no_grad():
            pool, sizes = all_gather_pool(emb, self.group, grad="none")
            pool_labels = _gather_labels(labels, sizes, self.group)
            ref_pool = ref_pool_labels = None
            if ref_emb is not None:
                ref_pool, rsizes = all_gather_pool(ref_emb, self.group, grad="none")
                ref_pool_labels = _gather_labels(_move(ref_labels, emb.device), rsizes, self.group)
        if not self.efficient:
            return self.miner(pool, pool_labels, ref_pool, ref_pool_labels)
        refs = pool if ref_pool is None else ref_pool
        ref_lab = pool_labels if ref_pool is None else ref_pool_labels
        n = emb.shape[0]
        excl = torch.arange(n, device=emb.device)
        # PML's get_indices_tuple removes self comparisons (also when ref_emb is given: it always does)
        with _context.pool_context(n, refs.shape[0], excl, reduce=False):
            out = self.miner(emb, labels, refs, ref_lab)
            if isinstance(out, (tuple, list)):
                # list a lazy result here, where the ops skip the self comparisons (later it would not know)
                out = tuple(out)
        if isinstance(out, tuple) and len(out) in (3, 4) and all(torch.is_tensor(t) for t in out):
            out = _remove_self(out, n)
        return out

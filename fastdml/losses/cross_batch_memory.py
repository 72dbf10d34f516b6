"""Cross-batch memory (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning"), PML's semantics, fused.

A ring buffer holds the last ``memory_size`` embeddings (detached) and their labels. Each call writes the
batch (or, with ``enqueue_mask``, its masked rows) into the buffer first, then evaluates the wrapped loss with
the batch as queries and the filled part of the buffer as references::

    L = loss(x, y, None, E_mem, L_mem)    with query i never compared with its own slot excl[i]

(PML's ``remove_self_comparisons``; with ``enqueue_mask`` the queries are the rows *not* enqueued and nothing
is excluded). PML lists every (query, memory) pair to do this; here the loss runs on the rectangular fused
ops with the per-query exclusion ``excl`` (through :func:`fastdml._context.pool_context`), so nothing of size
batch x memory is ever held (on the blocked CPU path the working memory stays within the memory budget).
Gradients reach the batch embeddings only (the memory is detached), as in PML.

With a ``miner``, the miner runs on (batch, memory) inside the same context (fastdml's miners skip the self
slots), then self comparisons are filtered from its tuple as PML does; with an explicit ``indices_tuple`` the
all-pairs tuple is listed and the two are concatenated (PML's behaviour; this path lists pairs).

Gradients: the memory needs none, so the stats ops run with ``need_grad_r=False`` (no column-side work, no
(k, M, D) gradient parts: with M = 65,536 those were most of the step's time and memory).

``torch.compile(fullgraph=True)``: the ring position is a tensor buffer (``queue_pos``; PML's ``queue_idx`` is a
property reading it), updated in place, so the graph does not depend on the position. Before the first wrap the
memory's filled prefix is a varying shape (PML uses ``memory[:queue_idx]``): its length is kept as the size of a
storage-free tensor, which Dynamo turns into a symbolic size after one recompile. So a compiled memory runs on a
handful of graphs (first call, the filling phase, the wrapping call, the full memory) however many steps it
runs (tests/test_cross_batch_memory_compile.py).

Calls whose sizes are data by PML's semantics also trace with ``fullgraph=True``, given Dynamo's
``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs`` (the settings ``torch.nonzero`` needs):
``enqueue_mask`` (the queries are the rows not enqueued; the filled prefix is read from the ``filled_count``
buffer, so ONE graph serves every step, wrap included), an explicit ``indices_tuple`` and miners that list
(the listing ops are custom ops whose sizes are known when the graph runs; the same handful of graphs as
above). Tested in tests/test_cross_batch_memory_data_sized_compile.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _context
from .._common import overrides_hook
from ..lazy import LazyIndices, TracedIndices
from ..utils.common_functions import resolve_collect_stats

__all__ = ["CrossBatchMemory"]

_SUPPORTED = (
    "AngularLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "IntraPairVarianceLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "NTXentLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
)


def _all_pairs(labels: Tensor, ref_labels: Tensor):
    """PML's ``get_all_pairs_indices``: positive and negative (query, reference) pairs in row-major order."""
    eq = labels[:, None] == ref_labels[None, :]
    a1, p = torch.where(eq)
    a2, n = torch.where(~eq)
    return a1, p, a2, n


def _remove_self(indices_tuple, excl: Tensor):
    """Drop the pairs/triplets (a, p) with ``p == excl[a]`` (a query against its own memory slot)."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = p != excl[a]
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = p != excl[a1]
    return a1[keep], p[keep], a2, n


def _pairs_to_triplets(indices_tuple):
    """PML's ``convert_to_triplets`` of a pair tuple: every (a, p) with every (a, n) of the same anchor."""
    a1, p, a2, n = indices_tuple
    pi, ni = torch.where(a1.unsqueeze(1) == a2)
    return a1[pi], p[pi], n[ni]


class CrossBatchMemory(torch.nn.Module):
    """``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``: the loss of each batch against
    a memory of the last ``memory_size`` embeddings (PML's call and semantics, see the module docstring).

    ``forward(embeddings, labels, indices_tuple=None, enqueue_mask=None)``: ``enqueue_mask`` (N,) bool puts
    only the masked rows into the memory and uses the other rows as queries (no self exclusion);
    ``indices_tuple`` and ``enqueue_mask`` are mutually exclusive.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, collect_stats=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)
        self.check_loss_support(type(loss).__name__)
        if int(embedding_size) < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if int(memory_size) < 1:
            raise ValueError(f"memory_size must be a positive int, got {memory_size!r}")
        self.loss = loss
        self.miner = miner
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.reset_queue()

    @staticmethod
    def supported_losses():
        """The loss classes ``CrossBatchMemory`` can wrap (PML's list)."""
        return list(_SUPPORTED)

    @classmethod
    def check_loss_support(cls, loss_name):
        """Raise a ``TypeError`` naming ``loss_func`` when it is not one of :meth:`supported_losses`."""
        if loss_name not in cls.supported_losses():
            raise Exception(f"CrossBatchMemory not supported for {loss_name}")

    def reset_queue(self):
        """Empty the memory (zeros, ``queue_idx = 0``, not filled)."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size).long())
        # the ring position as a tensor (not saved: PML's queue_idx is no part of the state dict either)
        self.register_buffer("queue_pos", torch.zeros((), dtype=torch.long), persistent=False)
        # the number of filled rows as a tensor too (min(rows written, memory_size)): a traced call whose batch
        # size is data (enqueue_mask) reads the filled prefix from it
        self.register_buffer("filled_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.has_been_filled = False
        # before the first wrap: a storage-free tensor whose dim 0 is the number of rows written
        self._filled_rows = torch.empty((0, 0))

    @property
    def queue_idx(self) -> int:
        """PML's ring position (the next slot written), read from the ``queue_pos`` buffer."""
        return int(self.queue_pos)

    @queue_idx.setter
    def queue_idx(self, value: int) -> None:
        """Where the next batch is written in the memory (PML's attribute)."""
        self.queue_pos.fill_(int(value))
        if not self.has_been_filled:
            self._filled_rows = torch.empty((int(value), 0))
            self.filled_count.fill_(int(value))

    def add_to_memory(self, embeddings: Tensor, labels: Tensor, batch_size: int):
        """Write ``embeddings`` (detached) at slots ``queue_idx, queue_idx + 1, ...`` modulo the memory size."""
        self._write(embeddings, labels, batch_size, python_state=True)

    def _write(self, embeddings: Tensor, labels: Tensor, batch_size, python_state: bool):
        pos = self.queue_pos.to(labels.device)
        self.curr_batch_idx = (pos + torch.arange(batch_size, device=labels.device)) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
        self.label_memory[self.curr_batch_idx] = labels.detach()
        self.queue_pos.copy_((pos + batch_size) % self.memory_size)
        self.filled_count.copy_((self.filled_count + batch_size).clamp_max(self.memory_size))
        if not python_state:
            # traced with a data-dependent batch size (enqueue_mask): the filled prefix is read from
            # filled_count (see forward); the Python-side state cannot follow the data inside a graph
            return
        if not self.has_been_filled:
            # PML: filled once the position wraps (queue_idx <= its previous value), i.e. rows + batch >= size
            rows = self._filled_rows.shape[0] + batch_size
            if rows >= self.memory_size:
                self.has_been_filled = True
                self._filled_rows = torch.empty((0, 0))
            else:
                self._filled_rows = self._filled_rows.new_empty((rows, 0))

    def _check(self, embeddings, labels, indices_tuple, enqueue_mask):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2 or not embeddings.is_floating_point():
            raise ValueError(
                f"embeddings must be a 2-D floating tensor (N, D), got {getattr(embeddings, 'shape', embeddings)}"
            )
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings have width {embeddings.shape[1]} but embedding_size is {self.embedding_size}")
        if not torch.is_tensor(labels) or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be a 1-D tensor of length {embeddings.shape[0]}, got {getattr(labels, 'shape', labels)}"
            )
        if enqueue_mask is not None:
            if not torch.is_tensor(enqueue_mask) or enqueue_mask.shape != (embeddings.shape[0],):
                raise ValueError(
                    f"enqueue_mask must be a bool tensor of shape ({embeddings.shape[0]},), "
                    f"got {getattr(enqueue_mask, 'shape', enqueue_mask)}"
                )
        elif embeddings.shape[0] > self.memory_size:
            raise ValueError(
                f"a batch of {embeddings.shape[0]} embeddings does not fit a memory of memory_size={self.memory_size}"
            )

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        """The wrapped loss of the batch against the memory (PML's semantics); the batch is then enqueued."""
        self._check(embeddings, labels, indices_tuple, enqueue_mask)
        device = embeddings.device
        labels = labels.to(device)
        if self.embedding_memory.device != device or self.embedding_memory.dtype != embeddings.dtype:
            self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        if self.label_memory.device != device or self.label_memory.dtype != labels.dtype:
            self.label_memory = self.label_memory.to(device=device, dtype=labels.dtype)
        if self.queue_pos.device != device:
            self.queue_pos = self.queue_pos.to(device)
        if self.filled_count.device != device:
            self.filled_count = self.filled_count.to(device)

        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device=device, dtype=torch.bool)
            # one index per side, so that rows and labels share one (data-dependent) size when traced
            rows_q = torch.nonzero(enqueue_mask).flatten()
            rows_k = torch.nonzero(~enqueue_mask).flatten()
            emb_q, lab_q = embeddings.index_select(0, rows_q), labels.index_select(0, rows_q)
            embeddings, labels = embeddings.index_select(0, rows_k), labels.index_select(0, rows_k)
            remove_self = False
        else:
            emb_q, lab_q = embeddings, labels
            remove_self = True

        data_sized = enqueue_mask is not None and torch.compiler.is_compiling()
        self._write(emb_q, lab_q, emb_q.shape[0], python_state=not data_sized)
        if data_sized:
            # the filled prefix after a data-dependent number of rows: a size known when the graph runs
            rows = self.filled_count.item()
            torch._check(rows >= 0)
            torch._check(rows <= self.memory_size)
            e_mem, l_mem = self.embedding_memory[:rows], self.label_memory[:rows]
        elif not self.has_been_filled:
            rows = self._filled_rows.shape[0]
            e_mem, l_mem = self.embedding_memory[:rows], self.label_memory[:rows]
        else:
            e_mem, l_mem = self.embedding_memory, self.label_memory

        n = embeddings.shape[0]
        excl = self.curr_batch_idx if remove_self else None
        fusable = indices_tuple is None and not overrides_hook(self, "create_indices_tuple")

        if fusable and self.miner is None:
            with _context.pool_context(n, e_mem.shape[0], excl) as ctx:
                loss = self.loss(embeddings, labels, None, e_mem, l_mem)
            if excl is None or ctx.applied > 0 or n == 0:
                return loss
            # the loss did not run on the rectangular ops (a configuration without a fused path): list the
            # pairs without self comparisons, as PML does
            return self.loss(embeddings, labels, _remove_self(_all_pairs(labels, l_mem), excl), e_mem, l_mem)

        if fusable and _band_miner(self.miner):
            # a threshold miner judges each pair / triplet on its own, so skipping the self slots while mining
            # (the ops' exclusion) selects exactly what PML's removal after mining keeps: evaluated fused
            with _context.pool_context(n, e_mem.shape[0], excl):
                mined = self.miner(embeddings, labels, e_mem, l_mem)
                if isinstance(mined, (LazyIndices, TracedIndices)) and not mined.is_materialized:
                    return self.loss(embeddings, labels, mined, e_mem, l_mem)
            mined = tuple(mined)
            return self.loss(embeddings, labels, mined if excl is None else _remove_self(mined, excl), e_mem, l_mem)

        # PML's general path: the miner mines the batch against the whole memory, then self comparisons go
        mined = self.create_indices_tuple(embeddings, labels, e_mem, l_mem, indices_tuple, remove_self)
        return self.loss(embeddings, labels, mined, e_mem, l_mem)

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        """PML's hook: the index tuple the loss gets. The inner miner's tuple (``miner(embeddings, labels, E_mem,
        L_mem)``), else every (query, memory) pair; without the self comparisons (query i against its own slot
        ``curr_batch_idx[i]``) if asked; then ``input_indices_tuple`` appended (converted to the same arity)."""
        if self.miner is not None:
            mined = tuple(self.miner(embeddings, labels, E_mem, L_mem))
        else:
            mined = _all_pairs(labels, L_mem)
        if do_remove_self_comparisons:
            mined = _remove_self(mined, self.curr_batch_idx)
        if input_indices_tuple is not None:
            given = tuple(torch.as_tensor(t, device=embeddings.device) for t in input_indices_tuple)
            if len(given) == 3 and len(mined) == 4:
                given = (given[0], given[1], given[0], given[2])
            elif len(given) == 4 and len(mined) == 3:
                given = _pairs_to_triplets(given)
            mined = tuple(torch.cat([m, g.to(m.device, m.dtype)], 0) for m, g in zip(mined, given))
        return mined


def _band_miner(miner) -> bool:
    """fastdml's TripletMarginMiner / PairMarginMiner, as fastdml runs them (no overridden hook, no statistics)."""
    from ..miners import PairMarginMiner, TripletMarginMiner

    if type(miner) not in (TripletMarginMiner, PairMarginMiner) or miner.collect_stats:
        return False
    return not overrides_hook(miner, *miner._fused_hooks)

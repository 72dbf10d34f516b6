"""Lazy mined results: what fastdml's miners return.

A :class:`LazyIndices` behaves as PML's index tuple ``(a, p, n)`` or ``(a1, p, a2, n)``: unpacking, indexing
and slicing, ``len`` (3 or 4, known without computing anything), iteration, ``==`` with tuples (tuple
semantics), ``isinstance(result, tuple)``, pickling/copying (as the plain tuple), and ``.to(...)``,
``.cpu()``, ``.cuda()`` (which return the plain tuple moved). The index tensors are computed on first read,
exactly as PML lists them (same indices, same order, int64), through :mod:`fastdml.ops`.

Until then nothing is listed: a fastdml loss given the result of a fastdml miner that ran on the very same
embeddings tensor (identity, unchanged since) with the same fused distance evaluates the selection on
the fly (for example TripletMarginMiner + TripletMarginLoss is one ``triplet_stats`` sweep with the miner's
band), so the lists, which can be far larger than the batch, are never built.

Caveat: the tuple's own storage is empty; Python-level access goes through the methods above, but C code
that reads a tuple's storage directly (e.g. passing the result itself as a tensor-list argument such as
``torch.stack(result)`` or ``torch.cat(result)``) sees an empty tuple and raises ("expected a non-empty list
of Tensors"). Use ``tuple(result)`` (or unpack it) there. (A tuple subclass is still the better trade: PML's
reducers assert ``isinstance(indices, tuple)``, so PML's losses accept fastdml's mined results.)
"""

from __future__ import annotations

import copy

import torch

__all__ = ["LazyIndices"]


class LazyIndices(tuple):
    """A PML index tuple computed on first read (see the module docstring).

    ``fuse`` (for fastdml's losses) describes how the selection was made; ``counter`` returns the number of
    tuples (triplets, or positive and negative pairs) without listing them.
    """

    def __new__(cls, arity, builder=None, value=None, fuse=None, counter=None):
        obj = super().__new__(cls)
        obj._arity = int(arity)
        obj._builder = builder
        obj._value = None if value is None else tuple(value)
        obj.fuse = fuse
        obj._counter = counter
        obj._cell = {"value": obj._value}  # shared with count_handle() closures
        if obj._value is not None and len(obj._value) != obj._arity:
            raise ValueError(f"LazyIndices: expected {arity} tensors, got {len(obj._value)}")
        return obj

    # ---- materialization ----
    def materialize(self) -> tuple:
        """The plain tuple of int64 index tensors (computed once)."""
        if self._value is None:
            value = tuple(self._builder())
            if len(value) != self._arity:
                raise RuntimeError(f"LazyIndices: the builder returned {len(value)} tensors, expected {self._arity}")
            self._value = value
            self._cell["value"] = value
            self._builder = None
        return self._value

    @property
    def is_materialized(self) -> bool:
        return self._value is not None

    def counts(self):
        """Number of triplets ``(T,)`` or of positive and negative pairs ``(P, Q)``, listing nothing if possible."""
        if self._value is None and self._counter is not None:
            return self._counter()
        v = self.materialize()
        return (len(v[0]),) if self._arity == 3 else (len(v[0]), len(v[2]))

    def count_handle(self):
        """A callable returning :meth:`counts` that does not keep this result (nor the embeddings it was mined
        on) alive: it uses the listed tuple if it has been read by then, else the counting sweep."""
        cell, counter, arity = self._cell, self._counter, self._arity

        def counts():
            v = cell["value"]
            if v is None and counter is not None:
                return counter()
            return (len(v[0]),) if arity == 3 else (len(v[0]), len(v[2]))

        return counts

    # ---- tuple protocol ----
    def __len__(self):
        return self._arity

    def __getitem__(self, key):
        return self.materialize()[key]

    def __iter__(self):
        return iter(self.materialize())

    def __reversed__(self):
        return reversed(self.materialize())

    def __contains__(self, item):
        return item in self.materialize()

    def __eq__(self, other):
        if isinstance(other, LazyIndices):
            other = other.materialize()
        return self.materialize() == other

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.materialize())

    def __add__(self, other):
        return self.materialize() + tuple(other)

    def __radd__(self, other):
        return tuple(other) + self.materialize()

    def __mul__(self, k):
        return self.materialize() * k

    __rmul__ = __mul__

    def __lt__(self, other):
        return self.materialize() < tuple(other)

    def __le__(self, other):
        return self.materialize() <= tuple(other)

    def __gt__(self, other):
        return self.materialize() > tuple(other)

    def __ge__(self, other):
        return self.materialize() >= tuple(other)

    def count(self, value):
        return self.materialize().count(value)

    def index(self, *args):
        return self.materialize().index(*args)

    def __repr__(self):
        if self._value is None:
            return f"LazyIndices(<{self._arity} index tensors, not yet listed>)"
        return repr(self._value)

    def __reduce__(self):
        return (tuple, (self.materialize(),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.materialize(), memo)

    # ---- device moves (plain tuples) ----
    def to(self, *args, **kwargs) -> tuple:
        return tuple(t.to(*args, **kwargs) for t in self.materialize())

    def cpu(self) -> tuple:
        return tuple(t.cpu() for t in self.materialize())

    def cuda(self, *args, **kwargs) -> tuple:
        return tuple(t.cuda(*args, **kwargs) for t in self.materialize())

    @property
    def device(self) -> torch.device:
        return self.materialize()[0].device


class TracedIndices:
    """What a fastdml miner returns while ``torch.compile`` traces it (a tuple subclass cannot be built in a
    traced region): the same selection record for fastdml's losses, and the sequence protocol (``len``,
    indexing, iteration: listed on first read, which breaks the graph) for anyone else. Outside compiled
    code the miners return :class:`LazyIndices`."""

    def __init__(self, arity, builder=None, fuse=None, counter=None, value=None):
        self._arity = arity
        self._builder = builder
        self._value = None if value is None else tuple(value)
        self.fuse = fuse
        self._counter = counter

    def materialize(self) -> tuple:
        if self._value is None:
            self._value = tuple(self._builder())
        return self._value

    @property
    def is_materialized(self) -> bool:
        return self._value is not None

    def count_handle(self):
        counter, arity, me = self._counter, self._arity, self

        def counts():
            if me._value is None and counter is not None:
                return counter()
            v = me.materialize()
            return (len(v[0]),) if arity == 3 else (len(v[0]), len(v[2]))

        return counts

    def __len__(self):
        return self._arity

    def __getitem__(self, key):
        return self.materialize()[key]

    def __iter__(self):
        return iter(self.materialize())


def make_lazy(arity, builder=None, value=None, fuse=None, counter=None):
    """A :class:`LazyIndices`, or a :class:`TracedIndices` while torch.compile traces (same record)."""
    if torch.compiler.is_compiling():
        return TracedIndices(arity, builder, fuse=fuse, counter=counter, value=value)
    return LazyIndices(arity, builder, value=value, fuse=fuse, counter=counter)

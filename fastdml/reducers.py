"""Reducers, drop-in for ``pytorch_metric_learning.reducers``.

A reducer turns a loss's per-element terms into one number. PML's call ``reducer(loss_dict, embeddings,
labels)`` works with the same loss-dict format (``{"loss": {"losses", "indices", "reduction_type"}}``).

For the fused ops, the four common reducers are a **window** over the terms, so a loss can be evaluated
from a sum ``S`` and a count ``C`` without ever listing the terms (see :func:`reducer_window`):

==========================  =========================  ==================================
reducer                     counted terms              value
==========================  =========================  ==================================
``MeanReducer``             all                        ``S / C``
``SumReducer``              all                        ``S``
``AvgNonZeroReducer``       ``t > 0``                  ``S / C``
``ThresholdReducer(lo, hi)``  ``lo < t < hi``          ``S / C``
==========================  =========================  ==================================

and zero (``(embeddings * 0).sum()``, attached to the graph) when ``C = 0``. PML's own reducer objects of
these classes map to the same windows. ``DoNothingReducer`` (returns the loss dict) and any other reducer
(custom subclasses) take the per-element path: the loss lists its terms and calls the reducer, as PML does.
``MultipleReducers`` applies one reducer per sub-loss (e.g. ``pos_loss`` / ``neg_loss`` of the contrastive
loss) and adds the results.
"""

from __future__ import annotations

import math
import sys

import torch

from . import _nanrule
from ._common import zero_loss
from .utils.common_functions import resolve_collect_stats

__all__ = [
    "BaseReducer",
    "MeanReducer",
    "SumReducer",
    "ThresholdReducer",
    "AvgNonZeroReducer",
    "DoNothingReducer",
    "MultipleReducers",
    "reducer_window",
    "is_do_nothing",
    "is_multiple",
]


_REDUCTION_TYPES = ("already_reduced", "element", "pos_pair", "neg_pair", "triplet")


class BaseReducer(torch.nn.Module):
    """PML's reducer protocol: ``forward(loss_dict, embeddings, labels)`` with a one-entry ``loss_dict``."""

    def __init__(self, collect_stats=None):
        super().__init__()
        self.collect_stats = resolve_collect_stats(collect_stats)
        if self.collect_stats:
            self.losses_size = 0

    def reset_stats(self):
        """PML's hook: zero the statistics this object records."""
        if self.collect_stats:
            self.losses_size = 0

    def forward(self, loss_dict, embeddings, labels):
        """Reduce the one entry of ``loss_dict`` with the hook named after its ``reduction_type``."""
        self.reset_stats()
        if len(loss_dict) != 1:
            raise ValueError(f"a reducer takes a one-entry loss dict, got {list(loss_dict)}")
        info = next(iter(loss_dict.values()))
        losses, loss_indices, reduction_type, kwargs = self.unpack_loss_info(info)
        return self.reduce_the_loss(losses, loss_indices, reduction_type, kwargs, embeddings, labels)

    # ---- PML's hooks ----
    def unpack_loss_info(self, loss_info):
        """PML's hook: ``(losses, indices, reduction_type, kwargs)`` of one loss-dict entry."""
        return loss_info["losses"], loss_info["indices"], loss_info["reduction_type"], {}

    def reduce_the_loss(self, losses, loss_indices, reduction_type, kwargs, embeddings, labels):
        """PML's hook: one entry's terms reduced to a scalar (PML's zero loss when ``losses`` is 0)."""
        self.set_losses_size_stat(losses)
        if self.input_is_zero_loss(losses):
            return self.zero_loss(embeddings)
        if reduction_type not in _REDUCTION_TYPES:
            raise ValueError(f"unknown reduction_type {reduction_type!r}")
        return self.get_reduction_func(reduction_type)(losses, loss_indices, embeddings, labels, **kwargs)

    def get_reduction_func(self, reduction_type):
        """PML's hook: the ``<reduction_type>_reduction`` method for one entry."""
        return getattr(self, f"{reduction_type}_reduction")

    def already_reduced_reduction(self, losses, loss_indices, embeddings, labels):
        """PML's hook: ``losses`` as given (the loss already reduced it)."""
        return losses

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        """PML's hook: the per-element terms ``l`` reduced to a scalar (subclasses define it)."""
        raise NotImplementedError

    # (PML's base raises for these three; here they default to element_reduction)
    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        """PML's hook: the positive-pair terms reduced (default: :meth:`element_reduction`)."""
        return self.element_reduction(losses, loss_indices, embeddings, labels)

    def neg_pair_reduction(self, losses, loss_indices, embeddings, labels):
        """PML's hook: the negative-pair terms reduced (default: :meth:`element_reduction`)."""
        return self.element_reduction(losses, loss_indices, embeddings, labels)

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        """PML's hook: the triplet terms reduced (default: :meth:`element_reduction`)."""
        return self.element_reduction(losses, loss_indices, embeddings, labels)

    def input_is_zero_loss(self, losses):
        """PML's hook: whether ``losses`` is the plain 0 a loss returns when nothing counts."""
        return not torch.is_tensor(losses) and losses == 0

    def set_losses_size_stat(self, losses):
        """PML's hook: record ``losses_size`` (the number of terms) when collecting statistics."""
        if self.collect_stats:
            self.losses_size = 1 if (not torch.is_tensor(losses) or losses.ndim == 0) else len(losses)

    def zero_loss(self, embeddings):
        """PML's zero loss (:func:`fastdml._common.zero_loss`)."""
        return zero_loss(embeddings)


class MeanReducer(BaseReducer):
    """Mean of all terms."""

    window = (-math.inf, math.inf, True)

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        """``mean(l)`` over the terms (PML's ``MeanReducer``)."""
        if torch.compiler.is_compiling():
            # traced: the number of terms may be data (a listed tuple), and may be 0 (PML: a zero loss)
            return losses.sum() / max(losses.shape[0], 1) if losses.ndim else losses
        return torch.mean(losses)


class SumReducer(MeanReducer):
    """Sum of all terms."""

    window = (-math.inf, math.inf, False)

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        """``sum(l)`` over the terms (PML's ``SumReducer``)."""
        return torch.sum(losses)


class ThresholdReducer(BaseReducer):
    """Mean of the terms with ``low < t < high`` (either bound may be None); zero if none qualifies."""

    def __init__(self, low=None, high=None, **kwargs):
        super().__init__(**kwargs)
        if low is None and high is None:
            raise ValueError("ThresholdReducer: at least one of low or high must be given")
        self.low = low
        self.high = high
        self.reset_stats()

    @property
    def window(self):
        """The fused path's counting window ``(low, high, mean)``; a NaN bound keeps nothing, as in PML."""
        low = -math.inf if self.low is None else float(self.low)
        return (*_nanrule.threshold_bounds(low, math.inf if self.high is None else float(self.high)), True)

    def reset_stats(self):
        """PML's hook: zero the statistics this object records."""
        super().reset_stats()
        if self.collect_stats:
            # PML's names (it resets num_below_high and sets num_above_high, the count of terms below high)
            self.num_past_filter = 0
            self.num_above_low = 0
            self.num_below_high = 0

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        """``mean(l)`` over the terms with ``low < l < high`` (PML's ``ThresholdReducer``)."""
        return self.element_reduction_helper(losses, embeddings)

    def element_reduction_helper(self, losses, embeddings):
        """PML's hook: ``mean(l)`` over the terms inside the window, recording the counts."""
        if torch.compiler.is_compiling() and not self.collect_stats:
            # traced: the mean over a mask instead of boolean indexing (whose size is data); nothing counted
            # gives an exact 0 with zero gradient, still attached to the graph
            keep = torch.ones_like(losses, dtype=torch.bool)
            if self.low is not None:
                keep = keep & (losses > self.low)
            if self.high is not None:
                keep = keep & (losses < self.high)
            total = torch.where(keep, losses, torch.zeros_like(losses)).sum()
            return total / keep.sum().clamp_min(1).to(total.dtype)
        low_cond = high_cond = None
        if self.low is not None:
            low_cond = losses > self.low
            losses = losses[low_cond]
        if self.high is not None:
            high_cond = losses < self.high
            losses = losses[high_cond]
        n = len(losses)
        if self.collect_stats:
            self.num_past_filter = n
            if low_cond is not None:
                self.num_above_low = int(low_cond.sum())
            if high_cond is not None:
                # PML's attribute name (it counts the terms below high)
                self.num_above_high = int(high_cond.sum())
        return torch.mean(losses) if n >= 1 else self.zero_loss(embeddings)


class AvgNonZeroReducer(ThresholdReducer):
    """Mean of the positive terms (PML's default for the contrastive and triplet losses)."""

    def __init__(self, **kwargs):
        kwargs.pop("low", None)
        super().__init__(low=0, **kwargs)


class DoNothingReducer(BaseReducer):
    """Returns the loss dict unreduced (per-element terms with their indices)."""

    def forward(self, loss_dict, embeddings, labels):
        """The loss dict's terms unreduced (PML's ``DoNothingReducer``)."""
        return loss_dict


class MultipleReducers(BaseReducer):
    """One reducer per sub-loss name (``default_reducer``, MeanReducer by default, for the others); the
    reduced sub-losses are added (in the embeddings' dtype as PML; float32 for half precision)."""

    def __init__(self, reducers, default_reducer=None, **kwargs):
        super().__init__(**kwargs)
        self.reducers = torch.nn.ModuleDict(reducers)
        self.default_reducer = MeanReducer() if default_reducer is None else default_reducer

    def reducer_for(self, name):
        """The reducer of sub-loss ``name`` (the default reducer when it has none)."""
        return self.reducers[name] if name in self.reducers else self.default_reducer

    def forward(self, loss_dict, embeddings, labels):
        """Each sub-loss reduced by its own reducer, then :meth:`sub_loss_reduction` of them."""
        self.reset_stats()
        # PML adds the sub-losses in the embeddings' dtype; half precision adds in float32 (one rounding at the end)
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        sub = torch.zeros(len(loss_dict), dtype=dtype, device=embeddings.device)
        for k, (name, info) in enumerate(loss_dict.items()):
            sub[k] = self.reducer_for(name)({name: info}, embeddings, labels)
        return self.sub_loss_reduction(sub, embeddings, labels)

    def sub_loss_reduction(self, sub_losses, embeddings=None, labels=None):
        """PML's hook: the reduced sub-losses combined (their sum)."""
        return torch.sum(sub_losses)


# ---- mapping reducer objects (fastdml's or PML's) to windows ----

_PML_WINDOWS = {
    "MeanReducer": lambda r: (-math.inf, math.inf, True),
    "SumReducer": lambda r: (-math.inf, math.inf, False),
    "AvgNonZeroReducer": lambda r: (0.0, math.inf, True),
    "ThresholdReducer": lambda r: (
        *_nanrule.threshold_bounds(
            -math.inf if r.low is None else float(r.low), math.inf if r.high is None else float(r.high)
        ),
        True,
    ),
}


def _pml_name(obj, sub="reducers"):
    mod = type(obj).__module__ or ""
    if mod.startswith(f"pytorch_metric_learning.{sub}"):
        return type(obj).__name__
    return None


def reducer_window(reducer) -> tuple[float, float, bool] | None:
    """``(low, high, divide)`` for Mean/Sum/AvgNonZero/Threshold reducers (fastdml's or PML's, exact classes),
    else None (per-element path). A term ``t`` is counted iff ``low < t < high`` (an infinite bound imposes
    nothing); the value is ``S / C`` if ``divide`` else ``S``. A reducer collecting statistics gets the terms."""
    if getattr(reducer, "collect_stats", False):
        return None
    if type(reducer) in (MeanReducer, SumReducer, ThresholdReducer, AvgNonZeroReducer):
        return reducer.window
    name = _pml_name(reducer)
    if name in _PML_WINDOWS:
        return _PML_WINDOWS[name](reducer)
    return None


def is_do_nothing(reducer) -> bool:
    """fastdml's or PML's DoNothingReducer (the loss then returns its loss dict)."""
    return isinstance(reducer, DoNothingReducer) or is_pml_do_nothing(reducer)


def _pml_reducer_class(name: str):
    """PML's reducer class ``name`` if PML's reducers are imported, else None. An instance of a PML class means
    its module is loaded, so nothing is imported here (a fastdml call with fastdml's reducers must not pay
    PML's import)."""
    module = sys.modules.get("pytorch_metric_learning.reducers")
    return None if module is None else getattr(module, name, None)


def is_multiple(reducer) -> bool:
    """Whether ``reducer`` is a ``MultipleReducers`` (fastdml's or PML's)."""
    if isinstance(reducer, MultipleReducers):
        return True
    cls = _pml_reducer_class("MultipleReducers")
    return cls is not None and isinstance(reducer, cls)


def is_pml_do_nothing(reducer) -> bool:
    """Whether ``reducer`` is PML's ``DoNothingReducer``."""
    cls = _pml_reducer_class("DoNothingReducer")
    return cls is not None and isinstance(reducer, cls)


def __getattr__(name):
    from ._fallback import pml_fallback

    return pml_fallback(__name__, "reducers", name, __all__)

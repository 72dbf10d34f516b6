"""PML's rule for non-finite input, in the few places where fastdml's fused arithmetic would otherwise differ.

* Nothing counted: PML's value is its zero loss ``sum(embeddings * 0)``, which is NaN when an embedding is NaN
  or infinite (a diverged model must not look converged); its gradient is 0.
* A NaN reducer bound: PML keeps the terms with ``t > low`` and ``t < high``; a NaN bound fails every
  comparison, which an empty bound (``low = +inf``, ``high = -inf``) expresses on every backend.
"""

from __future__ import annotations

import math

import torch


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """PML's zero loss ``sum(embeddings * 0)``: 0 with zero gradient, attached to the graph; NaN when an entry
    of ``embeddings`` is NaN or infinite."""
    return torch.sum(embeddings * 0)


def unless_counted(value: torch.Tensor, count: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``value`` where ``count > 0``, else PML's :func:`zero_loss` of ``embeddings`` (no host synchronisation;
    the gradient of the branch not taken is 0)."""
    z = zero_loss(embeddings).to(value.dtype)
    return torch.where(count.to(value.device) > 0, value, z)


def threshold_bounds(low: float, high: float) -> tuple[float, float]:
    """``(low, high)`` of a ``low < t < high`` window with a NaN bound replaced by its empty equivalent."""
    return (math.inf if math.isnan(low) else low), (-math.inf if math.isnan(high) else high)


def _finite(t: torch.Tensor | None) -> bool:
    if t is None or not t.is_floating_point():
        return True
    # one read pass: a finite sum means every entry is finite; a sum that overflows gets the exact check
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def needs_reference(x: torch.Tensor, r: torch.Tensor | None = None) -> bool:
    """True when an eager op on ``x`` (and ``r``) must run on the reference: an entry is NaN or infinite. The
    reference follows PML's comparisons with NaN exactly; the fused sweeps' interval arithmetic does not. Never
    while torch.compile traces (a graph cannot branch on data): there the backends' own NaN handling applies."""
    if torch.compiler.is_compiling():
        return False
    return not (_finite(x) and _finite(r))

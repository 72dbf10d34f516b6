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

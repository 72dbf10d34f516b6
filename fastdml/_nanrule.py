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
    z = torch.sum(embeddings * 0)
    if torch.compiler.is_compiling():
        # the compiler folds ``x * 0`` to 0, NaN or not: the NaN is added explicitly
        z = z + torch.where(torch.isfinite(embeddings).all(), 0.0, math.nan).to(z.dtype)
    return z


def unless_counted(value: torch.Tensor, count: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``value`` where ``count > 0``, else PML's :func:`zero_loss` of ``embeddings`` (no host synchronisation;
    the gradient of the branch not taken is 0)."""
    z = zero_loss(embeddings).to(value.dtype)
    return torch.where(count.to(value.device) > 0, value, z)


def threshold_bounds(low: float, high: float) -> tuple[float, float]:
    """``(low, high)`` of a ``low < t < high`` window with a NaN bound replaced by its empty equivalent."""
    return (math.inf if math.isnan(low) else low), (-math.inf if math.isnan(high) else high)


def extreme_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """Per row of ``t``: a NaN or an infinity, or a squared norm so large that a squared distance or dot product
    with it can overflow in the accumulation dtype (bool (N,); None for None)."""
    if t is None:
        return None
    if not t.is_floating_point() or t.ndim != 2:
        return torch.zeros(t.shape[:1], dtype=torch.bool, device=t.device)
    a = t.detach()
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    # one read pass, an (N,) temporary: |a|^2 is NaN/inf for a NaN/inf row; 4 |a|^2 bounds |a - b|^2 and 2|a.b|
    return (
        ~torch.isfinite(4 * torch.linalg.vecdot(a, a))
        if a.ndim == 2 and a.shape[1]
        else torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    )


def _extreme(t: torch.Tensor | None) -> bool:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return False  # (not floating: the op's own checks name the argument)
    # one read pass without temporaries; NaN propagates through aminmax. With m = max |t_ij|, every squared
    # distance and dot product is at most 4 D m^2 (conservative: at most a factor D above the row bound)
    lo, hi = torch.aminmax(t.detach())
    m = float(torch.maximum(lo.abs(), hi.abs()))  # one host sync; NaN propagates
    top = torch.finfo(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype).max
    return not (4.0 * t.shape[-1] * m * m <= top)


def extreme(x: torch.Tensor, r: torch.Tensor | None = None) -> bool:
    """True when ``x`` or ``r`` has a NaN or an infinity, or entries large enough that a squared distance or dot
    product could overflow the accumulation dtype."""
    return _extreme(x) or _extreme(r)

"""Label patterns shared by the backend tests (tests/blocked_cases.py, tests/kernel_cases.py)."""

from __future__ import annotations

import torch

PATTERNS = ("one", "distinct", "imbalanced", "pk")


def labels(pattern: str, n: int, g: torch.Generator, imbalanced_classes: int = 4) -> torch.Tensor:
    """int64 labels: one class, all distinct, imbalanced (class 0 holds ~60 %, the rest spread over
    ``imbalanced_classes`` small classes), PK-sampled (classes of K = 4 in random order), or "random"/"few"
    (uniform over 4 classes)."""
    if pattern == "one":
        return torch.zeros(n, dtype=torch.int64)
    if pattern == "distinct":
        return torch.randperm(n, generator=g)
    if pattern == "imbalanced":
        y = torch.randint(1, 1 + imbalanced_classes, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.6] = 0
        return y
    if pattern == "pk":
        return torch.randperm(n, generator=g) // 4
    if pattern in ("random", "few"):
        return torch.randint(0, 4, (n,), generator=g)
    raise ValueError(pattern)

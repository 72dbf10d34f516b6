"""Shared inputs and helpers of the public-API tests (test_pml_parity*, test_api*, test_errors*, test_fallback*).

Backends: the parity tests run the public API on every backend that implements the ops (``backend`` fixture):
``reference`` always; ``blocked`` / ``triton`` are skipped, with the reason, only while their module lacks an
op (the Triton kernels run on the CPU under ``TRITON_INTERPRET=1``, set by conftest; float64 inputs go to the
blocked path by design of fastdml.ops).

Expected values come from pytorch-metric-learning run in **float64** (PML's own float32 cdist uses the
``|a|^2 + |b|^2 - 2ab`` expansion above 25 rows and is inexact near zero distance), compared with fastdml's
result in the tested dtype at that dtype's tolerance (tests/conftest.py TOL).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import fastdml
from tests.conftest import TOL

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

BACKENDS = ("reference", "blocked", "triton")
OP_NAMES = {
    "contrastive_stats": "contrastive_stats_fwd",
    "triplet_stats": "triplet_stats_fwd",
    "semihard_stats": "semihard_stats_fwd",
    "row_extreme": "row_extreme",
    "triplet_list": "triplet_list",
    "pair_list": "pair_list",
}


def backend_missing(name: str) -> str | None:
    """Why ``name`` cannot run the public API yet (None when it can)."""
    if name == "reference":
        return None
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        # these tests build CPU tensors, which fastdml.dispatch gives the triton backend only under the
        # interpreter (same rule as dispatch.backend_for); on a GPU, tests/test_kernels_api.py covers the API
        return "the triton backend on CPU tensors needs TRITON_INTERPRET=1 (CUDA: tests/test_kernels_api.py)"
    modname = "fastdml.blocked" if name == "blocked" else "fastdml.kernels"
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # pragma: no cover - depends on the backend's state
        return f"{modname} does not import yet: {exc}"
    missing = [fn for fn in OP_NAMES.values() if not hasattr(mod, fn)]
    if missing:
        return f"{modname} does not implement {missing} yet"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = backend_missing(request.param)
    if reason:
        pytest.skip(reason)
    with fastdml.use_backend(request.param):
        yield request.param


def batch(n=16, d=4, classes=3, dtype=torch.float64, seed=0, pattern="random", scale=1.0):
    """Embeddings (n, d) and int64 labels with a label pattern: random, pk (balanced classes), one_class,
    distinct (all different), imbalanced (one big class and singletons)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    if pattern == "random":
        y = torch.randint(0, classes, (n,), generator=g)
    elif pattern == "pk":
        y = torch.arange(n) % classes
    elif pattern == "one_class":
        y = torch.zeros(n, dtype=torch.long)
    elif pattern == "distinct":
        y = torch.arange(n)
    elif pattern == "imbalanced":
        y = torch.where(torch.arange(n) < n // 2, torch.zeros(n, dtype=torch.long), torch.arange(n))
    else:
        raise ValueError(pattern)
    return x, y


def loss_and_grads(fn, *tensors, upstream=0.731):
    """``fn(*leaves)`` and the gradients of ``upstream * fn`` w.r.t. every input (None where unused)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out * upstream, leaves, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def assert_close_to_pml(got, want, dtype):
    """fastdml's (loss, grads) in ``dtype`` against PML's float64 (loss, grads)."""
    tol = TOL[dtype]
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl.to(torch.float64), wl.to(torch.float64), **tol)
    for a, b in zip(gg, wg):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert a is not None
        torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), **tol)


def as_tuple(indices):
    return tuple(indices)


def same_indices(a, b) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        u.dtype == v.dtype and u.shape == v.shape and torch.equal(u.cpu(), v.cpu()) for u, v in zip(a, b)
    )


# (name, fastdml factory, PML factory, margins suited to the distance)
DISTANCES = {
    "lp": (lambda: fastdml.distances.LpDistance(), lambda: pml_distances.LpDistance()),
    "lp_plain": (
        lambda: fastdml.distances.LpDistance(normalize_embeddings=False),
        lambda: pml_distances.LpDistance(normalize_embeddings=False),
    ),
    "lp_sq": (lambda: fastdml.distances.LpDistance(power=2), lambda: pml_distances.LpDistance(power=2)),
    "cosine": (lambda: fastdml.distances.CosineSimilarity(), lambda: pml_distances.CosineSimilarity()),
    "dot_plain": (
        lambda: fastdml.distances.DotProductSimilarity(normalize_embeddings=False),
        lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
    ),
    "lp1_generic": (lambda: fastdml.distances.LpDistance(p=1), lambda: pml_distances.LpDistance(p=1)),
    "lp_cube_generic": (lambda: fastdml.distances.LpDistance(power=3), lambda: pml_distances.LpDistance(power=3)),
}

# contrastive margins per distance family: (pos_margin, neg_margin)
CONTRASTIVE_MARGINS = {
    "lp": (0.2, 1.1),
    "lp_plain": (0.5, 2.5),
    "lp_sq": (0.1, 1.5),
    "cosine": (0.8, 0.3),
    "dot_plain": (1.0, -0.5),
    "lp1_generic": (0.5, 1.5),  # L1-normalized vectors of opposite signs are exactly 2 apart: keep away
    "lp_cube_generic": (0.05, 1.2),
}

REDUCERS = {
    "default": (lambda: None, lambda: None),
    "mean": (lambda: fastdml.reducers.MeanReducer(), lambda: pml_reducers.MeanReducer()),
    "sum": (lambda: fastdml.reducers.SumReducer(), lambda: pml_reducers.SumReducer()),
    "avgnonzero": (lambda: fastdml.reducers.AvgNonZeroReducer(), lambda: pml_reducers.AvgNonZeroReducer()),
    "threshold": (
        lambda: fastdml.reducers.ThresholdReducer(low=0.05, high=0.9),
        lambda: pml_reducers.ThresholdReducer(low=0.05, high=0.9),
    ),
    "pml_obj_mean": (lambda: pml_reducers.MeanReducer(), lambda: pml_reducers.MeanReducer()),
}

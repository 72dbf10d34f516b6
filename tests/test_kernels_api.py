"""The public API on the Triton kernels: losses and miners on kernel-device tensors against the reference.

On a GPU (``TRITON_INTERPRET=0``, bench/gpu_check.sh) the inputs are CUDA tensors and the default ``auto``
backend must pick the kernels; under the interpreter (CPU tests) the same cases run on CPU tensors with the
``triton`` backend forced. The oracle is the same public class under the ``reference`` backend on the very
values the kernels saw, upcast to float64 on the CPU. Values and gradients (random upstream) are compared at
the tolerance of the input dtype (tests/conftest.py TOL, plus the dtype's rounding for half precision).

The miner cases use inputs on a half-integer lattice with an unnormalized L2 distance: every squared
distance is then exact in every dtype and on every path, so the listed indices must be identical.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastdml
from fastdml import dispatch, distances, losses, miners

from .conftest import TOL
from .kernel_cases import DEVICE, needs_kernels

pytestmark = needs_kernels

ON_GPU = DEVICE == "cuda"
# bf16 arithmetic is broken in the interpreter (conftest notes): bf16 only on the GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def kernels_backend():
    """The backend context under which the kernel device's tensors reach the kernels."""
    return contextlib.nullcontext() if ON_GPU else fastdml.use_backend("triton")


LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9),
    "contrastive_sql2_raw": lambda: losses.ContrastiveLoss(
        pos_margin=0.5, neg_margin=6.0, distance=distances.LpDistance(normalize_embeddings=False, power=2)
    ),
    "triplet_all": lambda: losses.TripletMarginLoss(margin=0.3),
    "triplet_dot": lambda: losses.TripletMarginLoss(margin=0.3, distance=distances.DotProductSimilarity()),
    "batch_all": lambda: losses.BatchAllTripletLoss(),
    "batch_hard": lambda: losses.BatchHardTripletLoss(margin=0.3),
    "semihard": lambda: losses.SemiHardTripletLoss(margin=0.3),
    "triplet_with_batch_hard_miner": lambda: (losses.TripletMarginLoss(margin=0.3), miners.BatchHardMiner()),
}


def _run(make, x, y, upstream):
    """(value, dL/dx * upstream) of one loss (or loss with miner) at x."""
    obj = make()
    loss, miner = obj if isinstance(obj, tuple) else (obj, None)
    x = x.detach().clone().requires_grad_(True)
    idx = None if miner is None else miner(x, y)
    val = loss(x, y, idx)
    (val * upstream).backward()
    return val.detach(), x.grad


def _inputs(n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _assert_close(got, want, dtype, what):
    """float32: TOL; half precision: the dtype's rounding of the largest entry plus fp32 accumulation."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite result"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=what)
        return
    scale = want.abs().max().item()
    tol = torch.finfo(dtype).eps * scale + TOL[torch.float32]["rtol"] * scale + TOL[torch.float32]["atol"]
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} (largest {scale:.3g}, {dtype})"


# sizes: under the interpreter one tile-crossing size; on the GPU also D = 130 (three 64-wide D chunks) and
# more tiles (the float64 oracle on the CPU keeps O(N^3) triplet terms for autograd: N stays small)
SIZES = [(70, 33, 5)] + ([(300, 130, 7)] if ON_GPU else [])


@pytest.mark.parametrize("n,d,classes", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_on_kernels_matches_reference(name, dtype, n, d, classes):
    x, y = _inputs(n, d, classes, seed=n + d)
    xk = x.to(dtype)
    upstream = 0.5 + torch.rand(()).item()
    with kernels_backend():
        assert dispatch.backend_for(xk.to(DEVICE)) == "triton"
        got_val, got_grad = _run(LOSSES[name], xk.to(DEVICE), y.to(DEVICE), upstream)
    with fastdml.use_backend("reference"):
        want_val, want_grad = _run(LOSSES[name], xk.double(), y, upstream)
    assert got_val.device.type == DEVICE and got_grad.dtype == dtype
    assert want_grad.abs().max() > 0, "the case must exercise the gradient"
    _assert_close(got_val, want_val, dtype, f"{name} value")
    _assert_close(got_grad, want_grad, dtype, f"{name} gradient")


MINERS = {
    "triplet_all": lambda dist: miners.TripletMarginMiner(margin=0.7, type_of_triplets="all", distance=dist),
    "triplet_semihard": lambda dist: miners.TripletMarginMiner(margin=0.7, type_of_triplets="semihard", distance=dist),
    # margins off the lattice's distances sqrt(k) / 2 (a boundary case is not the point; GPU sqrt may be
    # approximate)
    "pair_margin": lambda dist: miners.PairMarginMiner(pos_margin=1.6, neg_margin=2.6, distance=dist),
    "batch_hard": lambda dist: miners.BatchHardMiner(distance=dist),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(MINERS))
def test_miner_on_kernels_lists_the_reference_indices(name, dtype):
    g = torch.Generator().manual_seed(7)
    n = 300 if ON_GPU else 70
    # half-integers in [-2, 2]: squared distances are small integers / 4, exact in fp16 and fp32
    x = (torch.randint(-4, 5, (n, 6), generator=g) / 2.0).to(dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    dist = distances.LpDistance(normalize_embeddings=False)
    # the miners may return lazy results: list the indices inside the backend context
    with kernels_backend():
        got = [t.cpu() for t in MINERS[name](dist)(x.to(DEVICE), y.to(DEVICE))]
    with fastdml.use_backend("reference"):
        want = list(MINERS[name](dist)(x.double(), y))
    assert len(got) == len(want) and sum(len(t) for t in want) > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"{name}: indices differ"

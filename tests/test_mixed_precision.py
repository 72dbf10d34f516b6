"""Mixed precision: fp16/bf16 embeddings and torch.autocast regions give fp32-accurate losses on every path.

The oracle is the same public loss on the same values upcast to float64, under the reference backend. The
ops accumulate in fp32, so the only error left is the final rounding of the value (and of each gradient
entry) to the embeddings' dtype: the tolerance is that dtype's epsilon, relative (gradients: relative to their
largest entry). Arithmetic in fp16 itself would miss it by far more at these sizes, and overflow: squared
distances of the "large" inputs below exceed fp16's 65504.
"""

from __future__ import annotations

import pytest
import torch

import fastdml
from fastdml import distances, losses, miners, reducers
from fastdml.cross_batch_memory import CrossBatchMemory

from .conftest import TOL, triton_on_cpu

HALF = (torch.float16, torch.bfloat16)


def _case(name):
    """(loss, miner or None): one per computation path."""
    if name == "contrastive_fused":
        return losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9), None
    if name == "contrastive_l2_unnormalized":
        return losses.ContrastiveLoss(
            pos_margin=1.0, neg_margin=40.0, distance=distances.LpDistance(normalize_embeddings=False)
        ), None
    if name == "triplet_all_fused":
        return losses.TripletMarginLoss(margin=0.5), None
    if name == "triplet_cosine_mean":
        return losses.TripletMarginLoss(
            margin=0.3, distance=distances.CosineSimilarity(), reducer=reducers.MeanReducer()
        ), None
    if name == "triplet_given_indices":
        return losses.TripletMarginLoss(margin=0.5), miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")
    if name == "triplet_batch_hard_miner":
        return losses.TripletMarginLoss(margin=0.5), miners.BatchHardMiner()
    if name == "batch_hard_one_pass":
        return losses.BatchHardTripletLoss(margin=0.5), None
    if name == "semihard_one_pass":
        return losses.SemiHardTripletLoss(margin=0.5), None
    raise ValueError(name)


CASES = [
    "contrastive_fused",
    "contrastive_l2_unnormalized",
    "triplet_all_fused",
    "triplet_cosine_mean",
    "triplet_given_indices",
    "triplet_batch_hard_miner",
    "batch_hard_one_pass",
    "semihard_one_pass",
]


def _inputs(n=96, d=32, scale=1.0, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _run(name, x, y, backend=None, selection=None):
    """Value and gradient of the loss (upstream 1.0) at x, under ``backend`` (None: the default); the miner's
    picks are made at x unless ``selection`` gives them."""
    loss, miner = _case(name)
    x = x.detach().clone().requires_grad_(True)
    ctx = fastdml.use_backend(backend) if backend else _nullcontext()
    with ctx:
        idx = None if miner is None else miner(x, y) if selection is None else selection
        val = loss(x, y, idx)
    val.backward()
    return val.detach(), x.grad


def _selection(name, x, y, backend=None):
    """The case's miner's picks at x (None without a miner): the oracle is evaluated on the same picks, as
    a pick may flip where two candidates' distances differ by less than the half-precision rounding."""
    _, miner = _case(name)
    if miner is None:
        return None
    with fastdml.use_backend(backend) if backend else _nullcontext():
        return tuple(miner(x, y))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_within_rounding(got, want, dtype):
    """|got - want| within the rounding of ``dtype`` (relative to the largest entry) plus fp32 accumulation."""
    eps = torch.finfo(dtype).eps
    scale = want.abs().max().item()
    tol = eps * scale + TOL[torch.float32]["rtol"] * scale + TOL[torch.float32]["atol"]
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"error {err:.3g} > {tol:.3g} (largest {scale:.3g}, {dtype})"


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_half_embeddings_give_fp32_accurate_loss_and_gradient(name, dtype, backend):
    scale = 8.0 if name == "contrastive_l2_unnormalized" else 1.0
    x, y = _inputs(scale=scale)
    xh = x.to(dtype)
    got_val, got_grad = _run(name, xh, y, backend)
    want_val, want_grad = _run(name, xh.double(), y, "reference", _selection(name, xh, y, backend))
    assert got_val.dtype == dtype and got_grad.dtype == dtype
    assert float(want_val) > 0 and want_grad.abs().max() > 0
    _assert_within_rounding(got_val, want_val, dtype)
    _assert_within_rounding(got_grad, want_grad, dtype)


@triton_on_cpu
@pytest.mark.parametrize("name", ["contrastive_fused", "triplet_all_fused", "batch_hard_one_pass", "semihard_one_pass"])
def test_fp16_embeddings_on_triton_kernels(name):
    """The Triton kernels (interpreter on the CPU; fp16 only: the interpreter's bf16 math is broken)."""
    x, y = _inputs(n=64, d=16)
    xh = x.to(torch.float16)
    got_val, got_grad = _run(name, xh, y, "triton")
    want_val, want_grad = _run(name, xh.double(), y, "reference")
    _assert_within_rounding(got_val, want_val, torch.float16)
    _assert_within_rounding(got_grad, want_grad, torch.float16)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fp16_squared_distances_do_not_overflow(backend):
    """Rows of norm ~ 240 in fp16: |x_i - x_j|^2 ~ 1e5 > 65504 (fp16's largest), the distances themselves
    (~ 340) fit. The loss is finite and fp32-accurate."""
    x, y = _inputs(n=48, d=64, scale=30.0)
    xh = x.to(torch.float16)
    name = "contrastive_l2_unnormalized"
    got_val, got_grad = _run(name, xh, y, backend)
    want_val, want_grad = _run(name, xh.double(), y, "reference")
    assert torch.isfinite(got_val) and bool(torch.isfinite(got_grad).all())
    _assert_within_rounding(got_val, want_val, torch.float16)
    _assert_within_rounding(got_grad, want_grad, torch.float16)


@pytest.mark.parametrize("name", ["contrastive_fused", "triplet_all_fused", "batch_hard_one_pass", "semihard_one_pass"])
def test_fp32_inputs_inside_autocast_stay_fp32_accurate(name):
    """fp32 embeddings inside torch.autocast(cpu, bfloat16): the ops must not run their GEMMs in bf16."""
    x, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_val, got_grad = _run(name, x, y)
    want_val, want_grad = _run(name, x.double(), y, "reference")
    torch.testing.assert_close(got_val.double(), want_val, **TOL[torch.float32])
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["contrastive_fused", "triplet_all_fused", "triplet_batch_hard_miner"])
def test_autocast_bf16_model_and_loss(name):
    """A linear model and the loss inside torch.autocast(cpu, bfloat16): the bf16 embeddings' loss and gradient
    are those of float64 on the same values, within bf16 rounding; the weights get a finite gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    x_in, y = _inputs(n=64, d=16)
    loss, miner = _case(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(x_in)
        emb.retain_grad()
        idx = None if miner is None else miner(emb, y)
        val = loss(emb, y, idx)
    assert emb.dtype == torch.bfloat16
    val.backward()
    want_val, want_grad = _run(name, emb.detach().double(), y, "reference")
    _assert_within_rounding(val.detach(), want_val, torch.bfloat16)
    _assert_within_rounding(emb.grad, want_grad, torch.bfloat16)
    assert bool(torch.isfinite(model.weight.grad).all()) and model.weight.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cross_batch_memory_with_half_embeddings(dtype):
    """The memory takes the embeddings' dtype (PML); the loss against it is fp32-accurate."""
    x, y = _inputs(n=40, d=16)
    wrapper = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9), 16, memory_size=64)
    oracle = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.9), 16, memory_size=64)
    for s in (slice(0, 20), slice(20, 40)):
        xh = x[s].to(dtype).requires_grad_(True)
        got = wrapper(xh, y[s])
        got.backward()
        xd = xh.detach().double().requires_grad_(True)
        with fastdml.use_backend("reference"):
            want = oracle(xd, y[s])
        want.backward()
        assert wrapper.embedding_memory.dtype == dtype
        _assert_within_rounding(got.detach(), want.detach(), dtype)
        _assert_within_rounding(xh.grad, xd.grad, dtype)

"""Hostile but valid input: labels changed after mining, float labels under torch.compile, NaN reducer
bounds, zero-width embeddings. Each case is compared with the reference backend and, where PML is
installed, with PML."""

import pytest
import torch

from fastdml import losses, miners, reducers
from fastdml.dispatch import use_backend

try:
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners
    import pytorch_metric_learning.reducers as pml_reducers
except ImportError:  # pragma: no cover - PML is a test dependency
    pml_losses = pml_miners = pml_reducers = None

needs_pml = pytest.mark.skipif(pml_losses is None, reason="pytorch-metric-learning not installed")


def _batch(n=48, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize(
    "make_miner, arity",
    [
        (lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"), 3),
        (lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"), 3),
        (lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8), 4),
        (lambda: miners.BatchHardMiner(), 3),
        (lambda: miners.BatchEasyHardMiner(), 4),
    ],
)
@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32, torch.float32])
def test_a_miner_result_is_fixed_when_mined_not_when_read(make_miner, arity, labels_dtype):
    x, y = _batch()
    y = y.to(labels_dtype)
    fresh = make_miner()
    want = tuple(t.clone() for t in fresh(x, y.clone()))
    loss_fn = losses.TripletMarginLoss(margin=0.2) if arity == 3 else losses.ContrastiveLoss()
    want_loss = loss_fn(x, y.clone(), fresh(x, y.clone()))
    miner = make_miner()
    r = miner(x, y)
    y.zero_()  # the caller reuses its label buffer after mining
    got_loss = loss_fn(x, y, r)  # the fused loss reads the mined pairs, not the new labels
    assert all(torch.equal(a, b) for a, b in zip(r, want))
    torch.testing.assert_close(got_loss, want_loss)
    counts = {3: "num_triplets", 4: "num_pos_pairs"}
    assert getattr(miner, counts[arity]) == getattr(fresh, counts[arity]) > 0


def test_compiled_loss_accepts_float_labels_fullgraph():
    x, y = _batch(n=24)
    fn = lambda t, lab: losses.TripletMarginLoss(margin=0.2)(t, lab, miners.BatchHardMiner()(t, lab))  # noqa: E731
    eager = fn(x, y)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x, y.float() * 0.5)
    torch.testing.assert_close(got, eager)


def test_float_labels_keep_equality_exactly():
    from fastdml._validation import labels_as_int64

    y = torch.tensor([0.5, -0.0, 0.0, 2.0, 0.5, float("inf"), 2.0])
    z = torch.tensor([2.0, 7.0, 0.5, float("inf")], dtype=torch.float64)
    cy, cz = labels_as_int64(y, z)
    assert torch.equal(cy[:, None] == cz[None, :], y.double()[:, None] == z[None, :])
    assert torch.equal(cy[:, None] == cy[None, :], y[:, None] == y[None, :])


BACKENDS = ["blocked", "reference", "triton"]


def _on(backend, fn):
    with use_backend(backend):
        return fn()


@needs_pml
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bounds", [dict(low=float("nan")), dict(high=float("nan")), dict(low=0.1, high=float("nan"))])
@pytest.mark.parametrize("loss_name", ["TripletMarginLoss", "ContrastiveLoss"])
def test_a_nan_threshold_bound_keeps_nothing_as_in_pml(backend, bounds, loss_name):
    x, y = _batch(n=24)
    got = _on(backend, lambda: getattr(losses, loss_name)(reducer=reducers.ThresholdReducer(**bounds))(x, y))
    want = getattr(pml_losses, loss_name)(reducer=pml_reducers.ThresholdReducer(**bounds))(x, y)
    assert float(want) == 0.0
    torch.testing.assert_close(got, want.to(got.dtype))


@needs_pml
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["contrastive", "triplet_all", "triplet_batch_hard", "batch_all", "batch_hard"])
def test_zero_width_embeddings_give_pmls_values(backend, case):
    x = torch.randn(16, 0, requires_grad=True)
    y = torch.arange(16) % 3
    ours = {
        "contrastive": lambda: losses.ContrastiveLoss()(x, y),
        "triplet_all": lambda: losses.TripletMarginLoss()(x, y),
        "triplet_batch_hard": lambda: losses.TripletMarginLoss()(x, y, miners.BatchHardMiner()(x, y)),
        "batch_all": lambda: losses.BatchAllTripletLoss()(x, y) if hasattr(losses, "BatchAllTripletLoss") else None,
        "batch_hard": lambda: losses.BatchHardTripletLoss()(x, y) if hasattr(losses, "BatchHardTripletLoss") else None,
    }[case]
    theirs = {
        "contrastive": lambda: pml_losses.ContrastiveLoss()(x, y),
        "triplet_all": lambda: pml_losses.TripletMarginLoss()(x, y),
        "triplet_batch_hard": lambda: pml_losses.TripletMarginLoss()(x, y, pml_miners.BatchHardMiner()(x, y)),
        "batch_all": lambda: pml_losses.TripletMarginLoss(margin=0.05)(x, y),
        "batch_hard": lambda: pml_losses.TripletMarginLoss(margin=0.05)(x, y, pml_miners.BatchHardMiner()(x, y)),
    }[case]
    got = _on(backend, ours)
    if got is None:
        pytest.skip("no such loss")
    want = theirs() if case not in ("batch_all", "batch_hard") else _on("reference", ours)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-6)
    got.backward()
    assert x.grad.shape == (16, 0)


@pytest.mark.parametrize("case", ["contrastive", "triplet_batch_hard"])
def test_zero_width_embeddings_compiled_equal_eager(case):
    # inside a compiled graph the op itself sends D = 0 to the reference (no eager check runs there)
    x = torch.zeros(8, 0, requires_grad=True)
    y = torch.arange(8) % 3
    fn = {
        "contrastive": lambda t: losses.ContrastiveLoss()(t, y),
        "triplet_batch_hard": lambda t: losses.TripletMarginLoss()(t, y, miners.BatchHardMiner()(t, y)),
    }[case]
    eager = fn(x)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(got, eager)

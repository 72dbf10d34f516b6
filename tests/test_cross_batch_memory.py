"""CrossBatchMemory: the fused (batch x memory, per-query exclusion) evaluation against the loss on an explicit
concatenation of the queue with listed pairs, and against PML's CrossBatchMemory, over steps that wrap the ring."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

import fastdml
from fastdml import losses, miners, reducers
from fastdml.cross_batch_memory import CrossBatchMemory
from fastdml.losses import cross_batch_memory as cbm_module

from .conftest import TOL, triton_on_cpu

D = 6
MEMORY = 16
STEPS = (5, 7, 6, 8, 3)  # batch sizes: the third step wraps the ring, the fourth fills it again


def _batches(dtype=torch.float64, seed=0, classes=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            (scale * torch.randn(b, D, generator=g, dtype=torch.float64)).to(dtype),
            torch.randint(0, classes, (b,), generator=g),
        )
        for b in STEPS
    ]


LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6),
    "contrastive_mean": lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6, reducer=reducers.MeanReducer()),
    "triplet": lambda: losses.TripletMarginLoss(margin=0.6),
    "triplet_cosine": lambda: losses.TripletMarginLoss(margin=0.3, distance=fastdml.distances.CosineSimilarity()),
}
PML_LOSSES = {
    "contrastive": lambda: pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6),
    "contrastive_mean": lambda: pml_losses.ContrastiveLoss(
        pos_margin=0.1, neg_margin=0.6, reducer=pml_reducers.MeanReducer()
    ),
    "triplet": lambda: pml_losses.TripletMarginLoss(margin=0.6),
    "triplet_cosine": lambda: pml_losses.TripletMarginLoss(margin=0.3, distance=pml_distances.CosineSimilarity()),
}


def _explicit_pairs(labels, queue_labels, self_index):
    """All (query, queue) positive and negative pairs, the query's own queue row removed."""
    eq = labels[:, None] == queue_labels[None, :]
    own = torch.zeros_like(eq)
    if self_index is not None:
        own[torch.arange(len(labels)), self_index] = True
    a1, p = torch.where(eq & ~own)
    a2, n = torch.where(~eq)
    return a1, p, a2, n


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_memory_loss_equals_loss_on_the_explicit_queue(name, backend):
    """Each step: the loss of the batch against the last MEMORY rows seen (an explicit concatenation of the
    batches), with every listed pair except each query against its own copy; values and gradients."""
    wrapper = CrossBatchMemory(LOSSES[name](), D, memory_size=MEMORY)
    oracle = LOSSES[name]()
    seen_e, seen_y = [], []
    upstream = 1.3
    for x, y in _batches():
        seen_e.append(x)
        seen_y.append(y)
        queue_e = torch.cat(seen_e)[-MEMORY:]
        queue_y = torch.cat(seen_y)[-MEMORY:]
        self_index = torch.arange(len(queue_e) - len(x), len(queue_e))

        xa = x.clone().requires_grad_(True)
        with fastdml.use_backend(backend):
            got = wrapper(xa, y)
        (got * upstream).backward()

        xb = x.clone().requires_grad_(True)
        with fastdml.use_backend("reference"):
            pairs = _explicit_pairs(y, queue_y, self_index)
            want = oracle(xb, y, pairs, queue_e.clone(), queue_y.clone())
        (want * upstream).backward()
        torch.testing.assert_close(got.detach(), want.detach(), **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
        assert float(want.detach()) > 0


@triton_on_cpu
@pytest.mark.parametrize("name", ["contrastive_mean", "triplet"])
def test_memory_on_triton_kernels_with_exclusion(name):
    """The Triton kernels (interpreter on the CPU) with the per-query exclusion, fp32, against the reference on
    the explicit queue."""
    wrapper = CrossBatchMemory(LOSSES[name](), D, memory_size=MEMORY)
    oracle = LOSSES[name]()
    seen_e, seen_y = [], []
    for x, y in _batches(dtype=torch.float32):
        seen_e.append(x)
        seen_y.append(y)
        queue_e, queue_y = torch.cat(seen_e)[-MEMORY:], torch.cat(seen_y)[-MEMORY:]
        self_index = torch.arange(len(queue_e) - len(x), len(queue_e))
        xa = x.clone().requires_grad_(True)
        with fastdml.use_backend("triton"):
            got = wrapper(xa, y)
        got.backward()
        xb = x.double().requires_grad_(True)
        with fastdml.use_backend("reference"):
            want = oracle(xb, y, _explicit_pairs(y, queue_y, self_index), queue_e.double(), queue_y.clone())
        want.backward()
        torch.testing.assert_close(got.detach().double(), want.detach(), **TOL[torch.float32])
        torch.testing.assert_close(xa.grad.double(), xb.grad, **TOL[torch.float32])


@pytest.mark.parametrize("name", list(LOSSES))
def test_memory_matches_pml_cross_batch_memory(name):
    ours = CrossBatchMemory(LOSSES[name](), D, memory_size=MEMORY)
    theirs = pml_losses.CrossBatchMemory(PML_LOSSES[name](), D, memory_size=MEMORY)
    for x, y in _batches():
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = ours(xa, y)
        b = theirs(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory, rtol=0, atol=0)


def test_enqueue_mask_matches_pml():
    ours = CrossBatchMemory(LOSSES["contrastive"](), D, memory_size=MEMORY)
    theirs = pml_losses.CrossBatchMemory(PML_LOSSES["contrastive"](), D, memory_size=MEMORY)
    g = torch.Generator().manual_seed(3)
    for x, y in _batches():
        mask = torch.rand(len(x), generator=g) < 0.5
        mask[0] = True
        mask[-1] = False
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = ours(xa, y, enqueue_mask=mask)
        b = theirs(xb, y, enqueue_mask=mask)
        a.backward()
        b.backward()
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])


@pytest.mark.parametrize(
    "make",
    [
        lambda: (
            losses.TripletMarginLoss(margin=0.6),
            miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
            pml_losses.TripletMarginLoss(margin=0.6),
            pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
        ),
        lambda: (
            losses.TripletMarginLoss(margin=0.6),
            miners.TripletMarginMiner(margin=0.6, type_of_triplets="all"),
            pml_losses.TripletMarginLoss(margin=0.6),
            pml_miners.TripletMarginMiner(margin=0.6, type_of_triplets="all"),
        ),
        lambda: (
            losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6),
            miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.5),
            pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6),
            pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.5),
        ),
        lambda: (
            losses.TripletMarginLoss(margin=0.6),
            miners.BatchHardMiner(),
            pml_losses.TripletMarginLoss(margin=0.6),
            pml_miners.BatchHardMiner(),
        ),
    ],
    ids=["semihard_triplet_miner", "all_triplet_miner", "pair_margin_miner", "batch_hard_miner"],
)
def test_memory_with_miner_matches_pml(make):
    loss, miner, pml_loss, pml_miner = make()
    ours = CrossBatchMemory(loss, D, memory_size=MEMORY, miner=miner)
    theirs = pml_losses.CrossBatchMemory(pml_loss, D, memory_size=MEMORY, miner=pml_miner)
    for x, y in _batches():
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = ours(xa, y)
        b = theirs(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])


def test_memory_with_given_indices_matches_pml():
    ours = CrossBatchMemory(LOSSES["triplet"](), D, memory_size=MEMORY)
    theirs = pml_losses.CrossBatchMemory(PML_LOSSES["triplet"](), D, memory_size=MEMORY)
    for x, y in _batches():
        idx = pml_miners.TripletMarginMiner(margin=0.6)(x, y)
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = ours(xa, y, idx)
        b = theirs(xb, y, idx)
        a.backward()
        b.backward()
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float64])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])


def test_fused_losses_never_list_batch_by_memory_pairs(monkeypatch):
    """Without miner or indices, a fused loss runs on the rectangular ops with the exclusion: the pair-listing
    fallback is never reached (it would raise here), and the ops took the exclusion."""

    def boom(*args, **kwargs):
        raise AssertionError("listed batch x memory pairs")

    monkeypatch.setattr(cbm_module, "_all_pairs", boom)
    for name in ("contrastive", "triplet"):
        wrapper = CrossBatchMemory(LOSSES[name](), D, memory_size=MEMORY)
        for x, y in _batches():
            out = wrapper(x.clone().requires_grad_(True), y)
            assert torch.isfinite(out)


def test_memory_size_65536_queue_runs_within_budget():
    """A large ring on the blocked path under a 1 MB working-memory budget: batches of 64 against a
    65,536-row memory; the value equals the loss on the explicit queue with listed pairs (reference)."""
    torch.manual_seed(0)
    make = LOSSES["contrastive_mean"]
    wrapper = CrossBatchMemory(make(), 4, memory_size=65536)
    seen_e, seen_y = [], []
    for _ in range(3):
        x = 0.3 * torch.randn(64, 4, dtype=torch.float64)
        y = torch.randint(0, 10, (64,))
        seen_e.append(x)
        seen_y.append(y)
        with fastdml.memory_budget(1):
            got = wrapper(x, y)
    queue_e, queue_y = torch.cat(seen_e), torch.cat(seen_y)
    with fastdml.use_backend("reference"):
        pairs = _explicit_pairs(y, queue_y, torch.arange(128, 192))
        want = make()(x, y, pairs, queue_e, queue_y)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_bad_inputs_raise_clear_errors():
    wrapper = CrossBatchMemory(LOSSES["contrastive"](), D, memory_size=4)
    x, y = torch.randn(5, D), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="memory_size"):
        wrapper(x, y)
    with pytest.raises(ValueError, match="embedding_size"):
        wrapper(torch.randn(3, D + 1), y[:3])
    with pytest.raises(ValueError, match="labels"):
        wrapper(torch.randn(3, D), y[:2])
    with pytest.raises(ValueError, match="mutually exclusive"):
        wrapper(x[:3], y[:3], (y[:1], y[:1], y[:1]), torch.ones(3, dtype=torch.bool))
    with pytest.raises(Exception, match="not supported"):
        CrossBatchMemory(losses.BatchHardTripletLoss(), D)


def test_exported_from_losses():
    assert fastdml.losses.CrossBatchMemory is CrossBatchMemory

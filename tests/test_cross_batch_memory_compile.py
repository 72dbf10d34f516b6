"""torch.compile of CrossBatchMemory: compiled equals eager over steps that wrap the ring (values, gradients,
queue state), with ``fullgraph=True``, for a loss written directly on ``fastdml.ops`` and for fastdml's own
losses; the ring position is a tensor, so the number of graphs stays bounded (no graph per position)."""

from __future__ import annotations

import pytest
import torch

from fastdml import losses
from fastdml.cross_batch_memory import CrossBatchMemory

from .conftest import TOL
from .test_distributed_compile import OpsContrastive


class ContrastiveLoss(OpsContrastive):
    """The traceable ops loss under the name CrossBatchMemory accepts (PML's supported-loss check)."""


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(0.3 * torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]


def step_both(eager, compiled, x, y, tol, *args, **kwargs):
    """One forward+backward step of an eager and a compiled memory on the same batch: equal values and
    gradients. Returns the eager loss and gradient."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = eager(xa, y, *args, **kwargs), compiled(xb, y, *args, **kwargs)
    a.backward()
    b.backward()
    torch.testing.assert_close(b.detach(), a.detach(), **tol)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    return a.detach(), xa.grad


@pytest.mark.slow
def test_compiled_memory_equals_eager_fullgraph():
    eager = CrossBatchMemory(ContrastiveLoss(), 4, memory_size=16)
    comp_mod = CrossBatchMemory(ContrastiveLoss(), 4, memory_size=16)
    compiled = torch.compile(comp_mod, fullgraph=True)
    for x, y in _batches():
        step_both(eager, compiled, x, y, TOL[torch.float32])
        assert comp_mod.queue_idx == eager.queue_idx
        torch.testing.assert_close(comp_mod.embedding_memory, eager.embedding_memory, rtol=0, atol=0)


class _GraphCounter:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly (aot_eager)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


FASTDML_LOSSES = {
    "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6),
    "triplet": lambda: losses.TripletMarginLoss(margin=0.4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FASTDML_LOSSES))
def test_compiled_memory_with_fastdml_loss_fullgraph_over_many_wraps(name):
    """fastdml's losses in the memory, fullgraph=True, 20 steps (the ring wraps 7 times, far more positions than
    Dynamo's recompile limit): equal to eager step by step, and a handful of graphs (first call, the filling
    phase with a symbolic row count, the wrapping call, the full memory)."""
    torch._dynamo.reset()
    counter = _GraphCounter()
    eager = CrossBatchMemory(FASTDML_LOSSES[name](), 4, memory_size=16)
    comp_mod = CrossBatchMemory(FASTDML_LOSSES[name](), 4, memory_size=16)
    compiled = torch.compile(comp_mod, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = 0.3 * torch.randn(6, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        step_both(eager, compiled, x, y, TOL[torch.float64])
        assert comp_mod.queue_idx == eager.queue_idx and comp_mod.has_been_filled == eager.has_been_filled
        torch.testing.assert_close(comp_mod.embedding_memory, eager.embedding_memory, rtol=0, atol=0)
    assert counter.graphs <= 5


@pytest.mark.slow
def test_compiled_memory_keeps_pml_zero_loss_for_at_most_one_pair():
    """One query per step into a memory of 4: while the query has at most one positive and one negative pair
    with the other memory rows, the loss is PML's zero (value and gradient); compiled (fullgraph=True, the rule
    decided without a host sync) equals eager at every step. (PML itself is not the oracle here: with one-row
    batches its ``remove_self_comparisons`` keeps the query's own slot, since the batch's first and last slot
    coincide.)"""
    torch._dynamo.reset()
    eager = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6), 3, memory_size=4)
    comp_mod = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6), 3, memory_size=4)
    compiled = torch.compile(comp_mod, fullgraph=True, backend=_GraphCounter())
    g = torch.Generator().manual_seed(2)
    seen = []
    zeros = []
    for lab in [0, 1, 1, 0, 0, 1, 0]:
        x = 0.4 * torch.randn(1, 3, generator=g, dtype=torch.float64)
        y = torch.tensor([lab])
        a, grad = step_both(eager, compiled, x, y, TOL[torch.float64])
        others = seen[-3:]  # the other rows of the memory (the query's own slot excluded)
        n_pos = sum(o == lab for o in others)
        at_most_one = n_pos <= 1 and len(others) - n_pos <= 1
        assert (float(a) == 0.0) == at_most_one
        if at_most_one:
            assert float(grad.abs().max()) == 0.0
        zeros.append(at_most_one)
        seen.append(lab)
    # the third step has one positive and one negative pair with non-zero terms: only the rule makes it zero
    assert zeros == [True, True, True, False, False, False, False]

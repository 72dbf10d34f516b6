"""torch.compile(fullgraph=True) of the calls whose sizes are data (PML's semantics): CrossBatchMemory with
``enqueue_mask`` (the queries are the rows not enqueued, the filled prefix grows by the mask's count), with an
explicit ``indices_tuple`` (the memory's all-pairs tuple is listed), with listing miners, and a loss on a
miner's listed tuple. With Dynamo's ``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs``
(as for ``torch.nonzero``), each traces into ONE graph that runs every step, through the ring's wrap, and
equals eager (values, gradients, the queue's state).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

from fastdml import losses, miners
from fastdml.cross_batch_memory import CrossBatchMemory

from .conftest import TOL
from .test_cross_batch_memory_compile import step_both

LOSSES = {"contrastive": losses.ContrastiveLoss, "triplet": losses.TripletMarginLoss}
MINERS = {
    "none": lambda: None,
    "batch_hard": miners.BatchHardMiner,
    "triplet_margin": lambda: miners.TripletMarginMiner(margin=0.2),
}


@pytest.fixture(autouse=True)
def _data_sized_capture():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        yield
    torch._dynamo.reset()


def _steps(n_steps, arity=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = torch.randn(12, 6, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        mask = torch.rand(12, generator=g) > 0.5
        idx = None if arity is None else tuple(torch.randint(0, 12, (7,), generator=g) for _ in range(arity))
        yield x, y, mask, idx


def _run(make_memory, call, n_steps=6, arity=None, backend="eager"):
    """Compiled and eager copies of one memory, stepped alike: values, gradients and queue state equal; the
    number of graphs compiled. ``call(mask, idx)`` gives the step's extra ``(args, kwargs)``."""
    eager = make_memory()
    compiled_mod = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=counter)
    for x, y, mask, idx in _steps(n_steps, arity):
        args, kwargs = call(mask, idx)
        step_both(eager, compiled, x, y, TOL[torch.float32], *args, **kwargs)
        assert int(compiled_mod.queue_pos) == eager.queue_idx
        assert torch.equal(compiled_mod.embedding_memory, eager.embedding_memory)
        assert torch.equal(compiled_mod.label_memory, eager.label_memory)
    return eager, compiled_mod, counter.frame_count


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_memory_with_enqueue_mask_compiles_into_one_graph_and_equals_eager(loss, miner):
    def make():
        return CrossBatchMemory(LOSSES[loss](), 6, memory_size=30, miner=MINERS[miner]())

    eager, compiled_mod, graphs = _run(make, lambda mask, idx: ((), {"enqueue_mask": mask}))
    assert eager.has_been_filled  # the ring wrapped during the steps
    assert int(compiled_mod.filled_count) == 30
    assert graphs == 1


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_memory_with_an_explicit_indices_tuple_compiles_into_one_graph_and_equals_eager(loss, miner):
    arity = 3 if loss == "triplet" else 4

    def make():
        return CrossBatchMemory(LOSSES[loss](), 6, memory_size=30, miner=MINERS[miner]())

    _, _, graphs = _run(make, lambda mask, idx: ((idx,), {}), arity=arity)
    assert graphs <= 4  # first call, the filling phase, the wrapping call, the full memory (as without a tuple)


def test_memory_with_enqueue_mask_compiles_with_inductor():
    def make():
        return CrossBatchMemory(losses.TripletMarginLoss(), 6, memory_size=30)

    _, _, graphs = _run(make, lambda mask, idx: ((), {"enqueue_mask": mask}), backend="inductor")
    assert graphs == 1


@pytest.mark.parametrize("miner", ["triplet_margin", "pair_margin"])
def test_a_loss_on_a_listing_miners_tuple_compiles_fullgraph(miner):
    # ContrastiveLoss cannot fuse a triplet selection: the miner's tuple is listed inside the graph
    loss_fn = losses.ContrastiveLoss()
    mine = miners.TripletMarginMiner(margin=0.3) if miner == "triplet_margin" else miners.PairMarginMiner()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 5, generator=g), torch.randint(0, 4, (20,), generator=g)

    def step(t):
        return loss_fn(t, y, mine(t, y))

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = step(xe)
    got = torch.compile(step, fullgraph=True, backend="eager")(xc)
    (ge,) = torch.autograd.grad(want, xe)
    (gc,) = torch.autograd.grad(got, xc)
    assert want.item() != 0.0
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(gc, ge, **TOL[torch.float32])

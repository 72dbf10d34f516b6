"""torch.compile of CrossBatchMemory: compiled equals eager over steps that wrap the ring (values, gradients,
queue state). ``fullgraph=True`` needs a traceable loss (here one written directly on ``fastdml.ops``); fastdml's
own losses currently have data-dependent Python branches (zero-count checks), so they compile with graph breaks
(``fullgraph=False``)."""

from __future__ import annotations

import pytest
import torch

from fastdml.cross_batch_memory import CrossBatchMemory

from .conftest import TOL
from .test_distributed_compile import OpsContrastive


class ContrastiveLoss(OpsContrastive):
    """The traceable ops loss under the name CrossBatchMemory accepts (PML's supported-loss check)."""


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(0.3 * torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]


@pytest.mark.slow
def test_compiled_memory_equals_eager_fullgraph():
    eager = CrossBatchMemory(ContrastiveLoss(), 4, memory_size=16)
    comp_mod = CrossBatchMemory(ContrastiveLoss(), 4, memory_size=16)
    compiled = torch.compile(comp_mod, fullgraph=True)
    for x, y in _batches():
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a = eager(xa, y)
        b = compiled(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(b.detach(), a.detach(), **TOL[torch.float32])
        torch.testing.assert_close(xb.grad, xa.grad, **TOL[torch.float32])
        assert comp_mod.queue_idx == eager.queue_idx
        torch.testing.assert_close(comp_mod.embedding_memory, eager.embedding_memory, rtol=0, atol=0)

"""torch.compile of the distributed wrapper on 2 gloo processes: compiled equals eager (value and gradient).

What compiles (see the report in fastdml/utils/distributed.py's docstring):

* ``fullgraph=True``: the wrapper's own code (functional collectives, the pool context) around a loss that is
  itself traceable (here a contrastive loss written directly on ``fastdml.ops``), equal batch sizes;
* the wrapper around fastdml's ContrastiveLoss with ``efficient=False`` and with ``efficient=True``
  (``fullgraph=True``; the rectangular path decides PML's "at most one pair" rule from the labels,
  without a host sync).
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch

from fastdml import ops
from fastdml.utils.distributed import DistributedLossWrapper

from .conftest import TOL
from .test_distributed import _to_bytes, run_world


class OpsContrastive(torch.nn.Module):
    """All-pairs contrastive loss straight on the fused op (traceable: no data-dependent Python branch)."""

    def forward(self, emb, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        s = ops.contrastive_stats(emb, labels, ref_emb, ref_labels, None, "l2", 0.1, 0.6, low=0.0)
        return s[0] / s[1].clamp(min=1) + s[2] / s[3].clamp(min=1)


def _data():
    g = torch.Generator().manual_seed(0)
    return 0.15 * torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


CASES = [
    ("ops_loss", True, False),
    ("ops_loss", True, True),
    ("fastdml_contrastive", True, False),
    ("fastdml_contrastive", True, True),
]


def _rank_main(rank, world, port, queue):
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        from fastdml import losses

        e_full, y_full = _data()
        n = e_full.shape[0] // world
        lo, hi = rank * n, (rank + 1) * n
        out = {}
        for name, fullgraph, efficient in CASES:
            loss = OpsContrastive() if name == "ops_loss" else losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6)
            wrapper = DistributedLossWrapper(loss, efficient=efficient)
            compiled = torch.compile(wrapper, fullgraph=fullgraph)
            res = []
            for fn in (wrapper, compiled):
                e = e_full.clone().requires_grad_(True)
                val = fn(e[lo:hi], y_full[lo:hi])
                val.backward()
                res.append((val.detach().clone(), e.grad.clone()))
            out[(name, fullgraph, efficient)] = res
        queue.put((rank, _to_bytes(out), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compiled_wrapper_equals_eager():
    results = run_world(_rank_main, (), timeout=240)
    for _rank, out in results.items():
        for case in CASES:
            (v_eager, g_eager), (v_comp, g_comp) = out[case]
            torch.testing.assert_close(v_comp, v_eager, **TOL[torch.float64])
            torch.testing.assert_close(g_comp, g_eager, **TOL[torch.float64])
            assert g_eager.abs().max() > 0

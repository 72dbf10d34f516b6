"""Predicted extra device memory of the Triton path, from the real launch plans and staging budget.

``predicted_extra_bytes(op, n, m, d, need_grad)`` is an upper bound of the bytes one loss call (forward and
backward) allocates beyond its inputs when its distance work runs on these kernels: the kernel buffers
(the same column splits, chunk sizes and staging budget as the launchers, on the current CUDA device) plus
an allowance for the op and loss layers' O(N D) tensors (gradient outputs, gathered picks, autograd saves).
bench/gpu_parity.py compares it with torch.cuda.max_memory_allocated; bench/gpu_check.sh skips a case whose
prediction exceeds the free memory.
"""

from __future__ import annotations

import torch
import triton

from . import _staged, contrastive, pairs
from ._common import PRECISIONS, column_split, extreme_configs

_OPS = ("contrastive", "triplet", "semihard", "row_hardest", "row_extreme", "pair_list")


def _layers_allowance(n: int, m: int, d: int) -> int:
    # the op and loss layers: up to 16 (rows, D) fp32 tensors (gradients, gathered anchors/positives/
    # negatives and their gradients, autograd saves), 32 int64/fp64 per row, and 2 MB of small tensors
    return 16 * (n + m) * d * 4 + 32 * 8 * (n + m) + 2 * 2**20


def predicted_extra_bytes(op: str, n: int, m: int, d: int, need_grad: bool = True, device=None) -> int:
    """Upper bound of the extra device memory of one call of ``op`` (one of contrastive, triplet, semihard,
    row_hardest, row_extreme, pair_list; pair_list's output lists are not included) on n queries, m
    references (m = n: the square case), D = d, in bytes."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    dev = device if device is not None else (torch.device("cuda") if torch.cuda.is_available() else None)
    base = 4 * (n + m) + 8 * n  # row norms, excluded indices
    if op == "contrastive":
        return base + contrastive.buffer_bytes(n, m, d, need_grad, dev) + _layers_allowance(n, m, d)
    if op in ("triplet", "semihard"):
        ch = _staged.chunk_rows(n, m, need_grad, _staged.stage_bytes())
        staged = ch * max(1, m) * 4 * (2 if need_grad else 1)
        grads = (2 * n + 2 * m) * d * 4 if need_grad else 0  # near scratch and gradient outputs
        return base + staged + grads + 3 * 8 * n + 16 * n + _layers_allowance(n, m, d)
    if op in ("row_hardest", "row_extreme"):
        # the autotuned sweeps may pick any candidate of any dtype and precision: the most column ranges of them
        dts = (torch.float32, torch.float16, torch.bfloat16)
        cands = [c for dt in dts for pr in PRECISIONS for c in extreme_configs(d, dt, pr)]
        s = max(column_split(triton.cdiv(n, c["BM"]), m, c["BN"], dev)[0] for c in cands)
        per = s * n * (4 + 8 + 1) + n * (4 + 8 + 1)
        return base + (2 if op == "row_hardest" else 1) * per + _layers_allowance(n, m, d)
    cfg = pairs.config(d)
    s, _ = column_split(triton.cdiv(n, cfg["BM"]), m, cfg["BN"], dev)
    return base + 2 * 2 * n * s * 8 + _layers_allowance(n, m, d)

"""Row helpers shared by every backend: the accumulation dtype and a deterministic scatter-add of rows."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for fp16/bf16/fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``target[index[t]] += rows[t]`` for every t (repeated indices add up), deterministically on any device:
    ``index_add_`` on the CPU (sequential, and faster than ``index_put_``), ``index_put_`` with accumulate on
    CUDA (deterministic under ``torch.use_deterministic_algorithms(True)``)."""
    if target.device.type == "cpu":
        target.index_add_(0, index, rows)
    else:
        target.index_put_((index,), rows, accumulate=True)

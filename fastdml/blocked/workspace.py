"""Scratch buffers that outlive a call, for the triplet-shaped sweeps' largest per-block temporaries.

Why: glibc serves a multi-megabyte CPU allocation with fresh pages from the kernel and gives them back when
it is freed, so an op that allocates its (b, M) temporaries anew on every call pays a page fault for each
4 kB page it touches. The all-triplets and semi-hard sweeps hold several (b, M) int64 and float tensors per
block (tens of MB at N = 1024): thousands of page faults per call (``python -m bench.experiments.faults``;
figures in ``bench/RESULTS.md``). Keeping those temporaries in buffers that live from call to
call removes the faults without touching the process's allocator (glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` would, but they are process-wide settings a library must not make for its users).
Ops with small temporaries (the contrastive tiles, batch-hard's score block: 1-5 MB) do not use it: glibc
already reuses that memory from call to call, and a kept buffer would only add to the peak of the rest of a
training step.

A buffer is named by its ``slot`` (one name per temporary that may be alive at the same time as another:
two live temporaries must never share a slot), and kept per thread (two threads running ops at once never
share one) and per dtype. It grows to the largest request and is kept; its size is that of a
block the memory budget planned, so what stays allocated between calls is bounded by the budget (twice it
for all the triplet-shaped windows together: ``tests/test_blocked_workspace.py``).
:func:`release` frees the calling thread's buffers (``fastdml.config.release_workspace``).

Only CPU tensors use it: on CUDA the caching allocator already reuses memory, so ``take`` returns a plain
``torch.empty`` there. Nothing taken from here may be returned to the caller or saved for the backward.
"""

from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def _buffers() -> dict:
    bufs = getattr(_local, "buffers", None)
    if bufs is None:
        bufs = _local.buffers = {}
    return bufs


def take(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape`` backed by the thread's buffer ``slot`` (CPU), or a
    fresh ``torch.empty`` (other devices). Valid until the next ``take`` of the same slot."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    key = (slot, dtype)
    bufs = _buffers()
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs.pop(key, None)  # (the old buffer is freed before the larger one is allocated)
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def held_bytes() -> int:
    """Bytes the calling thread's buffers hold."""
    return sum(b.numel() * b.element_size() for b in _buffers().values())


def release() -> None:
    """Free the calling thread's buffers (the next call allocates them again)."""
    _buffers().clear()

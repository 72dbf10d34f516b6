"""Process-wide settings: the blocked path's memory budget; the fp32 precision of the Triton kernels.

The blocked CPU path keeps its working memory (beyond inputs and outputs) under ``memory_budget_bytes()``:
64 MB by default, ``FASTDML_MEMORY_BUDGET_MB`` in the environment, or :func:`memory_budget` as a
context manager.
"""

from __future__ import annotations

import contextlib
import os
import threading

_DEFAULT_BUDGET_MB = 64.0
_budget_override: list[float] = []


def memory_budget_bytes() -> int:
    """Working-memory budget of the blocked path, in bytes."""
    if _budget_override:
        mb = _budget_override[-1]
    else:
        raw = os.environ.get("FASTDML_MEMORY_BUDGET_MB", "")
        try:
            mb = float(raw) if raw else _DEFAULT_BUDGET_MB
        except ValueError as exc:
            raise ValueError(f"FASTDML_MEMORY_BUDGET_MB must be a number of megabytes, got {raw!r}") from exc
    if mb <= 0:
        raise ValueError(f"the memory budget must be positive, got {mb} MB")
    return int(mb * 2**20)


@contextlib.contextmanager
def memory_budget(megabytes: float):
    """Temporarily set the blocked path's working-memory budget (in MB)."""
    if not megabytes > 0:
        raise ValueError(f"memory_budget: megabytes must be positive, got {megabytes}")
    _budget_override.append(float(megabytes))
    try:
        yield
    finally:
        _budget_override.pop()


def release_workspace() -> None:
    """Free the calling thread's blocked-path workspace: the scratch buffers its ops keep from call to call
    (at most about twice the memory budget; see ``fastdml.blocked.workspace``)."""
    from .blocked import workspace

    workspace.release()


# ----------------------------------------------------------------------------------------------------------
# fp32 matmul precision of the Triton kernels (thread-local override, then FASTDML_FP32_PRECISION, then ieee)
# ----------------------------------------------------------------------------------------------------------

FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")
_DEFAULT_FP32_PRECISION = "ieee"
_precision_local = threading.local()


def _check_precision(value, setting: str) -> str:
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in FP32_PRECISIONS:
        raise ValueError(f"{setting} must be one of {FP32_PRECISIONS}, got {value!r}")
    return name


def fp32_precision() -> str:
    """The precision of the distance and gradient ``tl.dot`` on float32 inputs in the Triton kernels.

    ``"ieee"`` (default): fp32 FMA, |error of x.r| <= ~D u32 sum_k |x_k r_k| (u32 = 2^-24), no tensor cores.
    ``"tf32x3"``: 3xTF32 on tensor cores (hi/lo split of both operands, the lo*lo product dropped):
    per product error <= ~3 u_t^2 |x_k r_k| (u_t = 2^-11, so ~7e-7) plus the fp32 accumulation error.
    ``"tf32"``: one TF32 product, per product error <= ~2 u_t |x_k r_k| (~1e-3 relative).
    Resolution order: the calling thread's :func:`fp32_precision_override`, then the environment variable
    ``FASTDML_FP32_PRECISION``, then ``"ieee"``. On ROCm builds of PyTorch (``torch.version.hip``) the Triton
    kernels always use ``"ieee"`` whatever this returns (see ``fastdml.kernels._common.precision``).
    """
    stack = getattr(_precision_local, "stack", None)
    if stack:
        return stack[-1]
    raw = os.environ.get("FASTDML_FP32_PRECISION", "")
    if not raw.strip():
        return _DEFAULT_FP32_PRECISION
    return _check_precision(raw, "FASTDML_FP32_PRECISION")


@contextlib.contextmanager
def fp32_precision_override(name: str):
    """Set the fp32 precision of the Triton kernels (``"ieee"``, ``"tf32x3"`` or ``"tf32"``) for the calling
    thread only, inside the ``with`` block; other threads keep theirs."""
    name = _check_precision(name, "fp32_precision_override: name")
    stack = getattr(_precision_local, "stack", None)
    if stack is None:
        stack = _precision_local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()

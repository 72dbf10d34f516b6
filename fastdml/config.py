"""Settings: the blocked path's memory budget; the fp32 precision of the Triton kernels.

The blocked CPU path keeps its working memory (beyond inputs and outputs) under ``memory_budget_bytes()``:
64 MB by default, ``FASTDML_MEMORY_BUDGET_MB`` in the environment, or :func:`memory_budget` as a
context manager (which sets it for the calling thread only).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

_DEFAULT_BUDGET_MB = 64.0
_local = threading.local()  # .budget: the memory_budget() blocks' stack, per thread


def _budget_stack() -> list[float]:
    if not hasattr(_local, "budget"):
        _local.budget = []
    return _local.budget


def _check_budget(mb: float, what: str) -> float:
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{what} must be a positive, finite number of megabytes, got {mb}")
    return mb


def memory_budget_bytes() -> int:
    """Working-memory budget of the blocked path, in bytes."""
    stack = _budget_stack()
    if stack:
        mb = stack[-1]
    else:
        raw = os.environ.get("FASTDML_MEMORY_BUDGET_MB", "")
        try:
            mb = float(raw) if raw else _DEFAULT_BUDGET_MB
        except ValueError as exc:
            raise ValueError(f"FASTDML_MEMORY_BUDGET_MB must be a number of megabytes, got {raw!r}") from exc
        _check_budget(mb, "FASTDML_MEMORY_BUDGET_MB")
    return int(mb * 2**20)


@contextlib.contextmanager
def memory_budget(megabytes: float):
    """Set the blocked path's working-memory budget (in MB) for the calling thread, within the block."""
    try:
        mb = float(megabytes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"memory_budget: megabytes must be a number, got {megabytes!r}") from exc
    stack = _budget_stack()
    stack.append(_check_budget(mb, "memory_budget: megabytes"))
    try:
        yield
    finally:
        stack.pop()


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

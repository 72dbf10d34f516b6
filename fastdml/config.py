"""Settings: the blocked path's memory budget.

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

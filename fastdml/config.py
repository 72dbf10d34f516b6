"""Process-wide settings: the blocked path's memory budget.

The blocked CPU path keeps its working memory (beyond inputs and outputs) under ``memory_budget_bytes()``:
64 MB by default, ``FASTDML_MEMORY_BUDGET_MB`` in the environment, or :func:`memory_budget` as a
context manager.
"""

from __future__ import annotations

import contextlib
import os

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

"""Block sizes of the blocked CPU path, from the working-memory budget.

Every op of :mod:`fastdml.blocked` sweeps blocks of ``b`` anchor rows against all ``M`` references. The
temporaries of one block are a handful of ``(b, M)`` tensors (distances, masks, pair weights, ...), so an op
states its cost as ``bytes_per_entry`` (bytes per ``(row, reference)`` entry, all temporaries together) and

    b = floor((budget - fixed_bytes) / (M * bytes_per_entry)),   1 <= b <= N,

with ``budget = fastdml.config.memory_budget_bytes()`` (64 MB by default). The full ``N x M`` matrix is
built only when it fits. One row is the floor: for ``M * bytes_per_entry`` above the budget (M in the
millions) the working memory is that of one row.

:data:`peak_log` is a test hook: when it is a list, :func:`rows_per_block` appends the bytes it planned
(``b * M * bytes_per_entry + fixed_bytes``) so the tests can check what the ops planned against the budget
(the tests also measure the allocations themselves).
"""

from __future__ import annotations

from ..config import memory_budget_bytes

# set to a list by tests to record every planned block size (bytes); None in normal use
peak_log: list[int] | None = None


def budget_bytes() -> int:
    """The working-memory budget in bytes (``fastdml.config.memory_budget_bytes()``)."""
    return memory_budget_bytes()


def rows_per_block(n_rows: int, n_cols: int, bytes_per_entry: float, fixed_bytes: int = 0) -> int:
    """Rows ``b`` of a block so that ``b * n_cols * bytes_per_entry + fixed_bytes`` fits the budget.

    At least 1 (a single row is always processed), at most ``n_rows`` (at least 1 when ``n_rows`` is 0).
    """
    avail = budget_bytes() - int(fixed_bytes)
    per_row = max(1.0, float(n_cols) * float(bytes_per_entry))
    b = int(avail // per_row) if avail > 0 else 1
    b = max(1, min(b, max(1, int(n_rows))))
    if peak_log is not None:
        peak_log.append(int(b * per_row) + int(fixed_bytes))
    return b


def blocks(n_rows: int, rows: int):
    """``(start, end)`` of consecutive row blocks of ``rows`` rows covering ``0..n_rows``."""
    for s in range(0, n_rows, rows):
        yield s, min(n_rows, s + rows)


def chunk_bounds(costs, limit: float):
    """Split consecutive items with per-item ``costs`` (a 1-D int64 tensor) into ranges whose cost stays
    under ``limit`` (an item costing more than ``limit`` forms its own range). Returns a list of (start, end).
    """
    out = []
    n = int(costs.numel())
    if n == 0:
        return out
    cum = costs.cumsum(0).tolist()
    start, base = 0, 0
    for i in range(n):
        if cum[i] - base > limit and i > start:
            out.append((start, i))
            start, base = i, cum[i - 1]
    out.append((start, n))
    return out

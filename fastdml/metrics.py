"""Retrieval metrics of an embedding by a blocked k-nearest-neighbour search (no faiss, no n x m matrix).

Notation: query ``i`` with label ``y_i``; its neighbours in the reference set, nearest first, ``j_1, j_2, ...``
(Euclidean distance; with ``ref_includes_query`` the first ``n`` references are the queries themselves and
query ``i`` never retrieves reference ``i``: leave-one-out); ``s_t = [label(j_t) == y_i]``;
``R_i`` = the number of references with label ``y_i`` (less query ``i`` itself when included).

- precision@1: ``s_1``;
- R-precision: ``(1 / R_i) sum_{t <= R_i} s_t``;
- MAP@R: ``(1 / R_i) sum_{t <= R_i} s_t * P_i(t)``, ``P_i(t) = (1 / t) sum_{u <= t} s_u``;
- MAP (over the first ``k`` neighbours): ``(1 / R_i) sum_{t <= k} s_t * P_i(t)``;
- mean reciprocal rank: ``1 / min{t : s_t}`` (0 if none of the ``k`` neighbours matches);
- 1-NN accuracy (train -> test): precision@1 of the test queries against the training set.

Each is averaged over the queries with ``R_i > 0`` (a query whose class has no other reference is
"lone" and skipped, as in pytorch-metric-learning), or class by class with ``avg_of_avgs``. The definitions
(and the clipping of ``R_i`` to ``k`` when fewer neighbours are retrieved) follow PML's
``AccuracyCalculator``; :class:`AccuracyCalculator` here has PML's call and metric names.

The search runs over blocks of queries: a block's distances to every reference, then ``torch.topk``; working
memory stays within ``fastdml.config.memory_budget_bytes()`` (at least one query row), so a 10k x 60k
distance matrix is never held. The order of exactly tied distances is unspecified (``torch.topk``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .config import memory_budget_bytes

__all__ = [
    "knn",
    "BlockedKNN",
    "retrieval_metrics",
    "knn_accuracy",
    "AccuracyCalculator",
    "METRICS",
]

# metric names, as pytorch-metric-learning's AccuracyCalculator spells them
METRICS = (
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
_CLUSTERING = ("AMI", "NMI")


# --------------------------------------------------------------------------------------------- helpers
def _as_tensor(x, name: str, device=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x if device is None else x.to(device)


def _check_embeddings(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_labels(labels: torch.Tensor, n: int, name: str, embeddings_name: str) -> torch.Tensor:
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {tuple(labels.shape)}")
    if len(labels) != n:
        raise ValueError(f"{name} has length {len(labels)} but {embeddings_name} has {n} rows")
    return labels


def _block_rows(m: int, k: int, d: int, budget: int | None) -> int:
    """Queries per block: a row costs its m distances (+ a topk copy) and k indices/labels/values."""
    budget = memory_budget_bytes() if budget is None else int(budget)
    per_row = 8 * m + 24 * max(k, 1) + (4 * m * d if d <= 16 else 0)
    return max(1, budget // per_row)


def _block_distances(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (b, m); exact differences for small d (the 2-D demo), GEMM otherwise."""
    if q.shape[1] <= 16:
        return torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.cdist(q, r, compute_mode="use_mm_for_euclid_dist")


def _iter_knn(query, reference, k, ref_includes_query, budget=None):
    """Yield ``(start, distances (b, k), indices (b, k))`` per block of queries, nearest first."""
    n, m = len(query), len(reference)
    if ref_includes_query and m < n:
        raise ValueError(f"ref_includes_query needs len(reference) >= len(query), got {m} < {n}")
    available = m - int(ref_includes_query)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (references available per query), got {k}")
    # distances in float32 at least (float64 inputs stay float64)
    dtype = torch.promote_types(query.dtype, torch.float32)
    reference = reference.to(dtype)
    rows = _block_rows(m, k, query.shape[1], budget)
    for start in range(0, n, rows):
        q = query[start : start + rows].to(dtype)
        dist = _block_distances(q, reference)
        if ref_includes_query:
            own = torch.arange(start, start + len(q), device=dist.device)
            dist[torch.arange(len(q), device=dist.device), own] = float("inf")
        values, indices = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        yield start, values, indices


def knn(query, reference, k: int, ref_includes_query: bool = False, memory_budget: int | None = None):
    """The ``k`` nearest references of every query (Euclidean), by blocks of queries.

    Returns ``(distances (n, k), indices (n, k))``, nearest first. With ``ref_includes_query``, query ``i`` is
    reference ``i`` and is never its own neighbour. ``memory_budget``: working bytes (default: fastdml's).
    """
    query = _check_embeddings(_as_tensor(query, "query"), "query")
    reference = _check_embeddings(_as_tensor(reference, "reference", query.device), "reference")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query has dimension {query.shape[1]} but reference has {reference.shape[1]}")
    all_d, all_i = [], []
    for _, values, indices in _iter_knn(query, reference, k, ref_includes_query, memory_budget):
        all_d.append(values)
        all_i.append(indices)
    return torch.cat(all_d), torch.cat(all_i)


class BlockedKNN:
    """PML-style ``knn_func(query, k, reference, ref_includes_query) -> (distances, indices)``."""

    def __init__(self, memory_budget: int | None = None) -> None:
        self.memory_budget = memory_budget

    def __call__(self, query, k, reference, ref_includes_query):
        return knn(query, reference, k, ref_includes_query, self.memory_budget)


# ------------------------------------------------------------------------------------ per-query values
def _per_query(same: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query metrics from ``same`` (b, k) bool (neighbour t matches) and ``r`` (b,) relevant counts."""
    b, k = same.shape
    s = same.to(torch.float64)
    ranks = torch.arange(1, k + 1, device=same.device, dtype=torch.float64)
    precision_at_t = torch.cumsum(s, dim=1) / ranks  # P_i(t)
    r64 = r.to(torch.float64)
    within_r = ranks[None, :] <= r64[:, None]  # t <= R_i (clipped to k by the shape)
    clipped = torch.clamp(r64, max=k)
    hits = s * precision_at_t
    first = torch.where(same.any(dim=1), same.to(torch.int8).argmax(dim=1).to(torch.float64) + 1, torch.inf)
    return {
        "precision_at_1": s[:, 0],
        "r_precision": (s * within_r).sum(dim=1) / clipped,
        "mean_average_precision_at_r": (hits * within_r).sum(dim=1) / r64,
        "mean_average_precision": hits.sum(dim=1) / r64,
        "mean_reciprocal_rank": 1.0 / first,
    }


def _relevant_counts(query_labels, reference_labels, ref_includes_query, compare):
    """``R_i`` for every query (the number of references matching query i, itself excluded)."""
    unique, inverse = torch.unique(query_labels, return_inverse=True)
    counts = (
        torch.stack([compare(u[None], reference_labels).sum() for u in unique])
        if compare is not None
        else (unique[:, None] == reference_labels[None, :]).sum(dim=1)
    )
    r = counts[inverse].to(torch.int64)
    if ref_includes_query:
        own = compare(unique, unique) if compare is not None else torch.ones_like(unique, dtype=torch.bool)
        r = r - own[inverse].to(torch.int64)
    return r


def _average(values: torch.Tensor, labels: torch.Tensor, avg_of_avgs: bool, return_per_class: bool):
    if return_per_class or avg_of_avgs:
        unique, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(unique), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
        counts = torch.bincount(inverse, minlength=len(unique)).to(torch.float64)
        per_class = sums / counts
        return per_class.cpu().tolist() if return_per_class else per_class.mean().item()
    return values.mean().item()


def _evaluate(
    query,
    query_labels,
    reference,
    reference_labels,
    ref_includes_query,
    names,
    k,
    knn_func=None,
    compare=None,
    avg_of_avgs=False,
    return_per_class=False,
    memory_budget=None,
):
    """The named kNN metrics; ``k`` retrieved neighbours per query (None: as many as needed)."""
    r = _relevant_counts(query_labels, reference_labels, ref_includes_query, compare)
    keep = r > 0  # lone queries (no other reference of their class) are skipped
    if not bool(keep.any()):
        if return_per_class:
            return {name: [float("nan")] * len(torch.unique(query_labels)) for name in names}
        return {name: float("nan") for name in names}
    available = len(reference) - int(ref_includes_query)
    if k is None:
        need = {"mean_average_precision", "mean_reciprocal_rank"} & set(names)
        k = (
            available
            if need
            else max(1, int(r.max()) if {"r_precision", "mean_average_precision_at_r"} & set(names) else 1)
        )
    k = min(k, available)
    values = {name: torch.empty(len(query), dtype=torch.float64, device=query.device) for name in names}

    if knn_func is not None:
        _, indices = knn_func(query, k, reference, ref_includes_query)
        blocks = [(0, indices.to(query.device))]
    else:
        blocks = ((start, idx) for start, _, idx in _iter_knn(query, reference, k, ref_includes_query, memory_budget))
    for start, indices in blocks:
        stop = start + len(indices)
        neighbour_labels = reference_labels[indices]
        own = query_labels[start:stop, None]
        same = compare(own, neighbour_labels) if compare is not None else neighbour_labels == own
        per_query = _per_query(same.bool(), r[start:stop])
        for name in names:
            values[name][start:stop] = per_query[name]
    return {name: _average(values[name][keep], query_labels[keep], avg_of_avgs, return_per_class) for name in names}


def _prepare(query, query_labels, reference, reference_labels, ref_includes_query, device=None):
    query = _check_embeddings(_as_tensor(query, "query", device), "query")
    query_labels = _check_labels(
        _as_tensor(query_labels, "query_labels", query.device), len(query), "query_labels", "query"
    )
    if reference is None:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference")
        reference, reference_labels, ref_includes_query = query, query_labels, True
    else:
        if reference_labels is None:
            raise ValueError("reference given without reference_labels")
        reference = _check_embeddings(_as_tensor(reference, "reference", query.device), "reference")
        reference_labels = _check_labels(
            _as_tensor(reference_labels, "reference_labels", query.device),
            len(reference),
            "reference_labels",
            "reference",
        )
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query has dimension {query.shape[1]} but reference has {reference.shape[1]}")
    if ref_includes_query:
        n = len(query)
        if len(reference) < n or not (
            torch.equal(reference[:n].to(query.dtype), query) and torch.equal(reference_labels[:n], query_labels)
        ):
            raise ValueError(
                "ref_includes_query=True needs the first len(query) rows of reference (and "
                "reference_labels) to equal query (and query_labels)"
            )
    return query, query_labels, reference, reference_labels, ref_includes_query


# --------------------------------------------------------------------------------------- public metrics
def retrieval_metrics(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ref_includes_query: bool = False,
    memory_budget: int | None = None,
) -> dict[str, float]:
    """precision@1, R-precision and MAP@R (module docstring) of ``query`` against ``reference``.

    Without ``reference``: the queries against themselves, leave-one-out (the demo's test-set figures).
    """
    q, ql, r, rl, inc = _prepare(query, query_labels, reference, reference_labels, ref_includes_query)
    names = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    return _evaluate(q, ql, r, rl, inc, names, None, memory_budget=memory_budget)


def knn_accuracy(query, query_labels, reference, reference_labels, memory_budget: int | None = None) -> float:
    """1-NN classification accuracy: the fraction of queries whose nearest reference has their label.

    Unlike precision@1, every query counts (one whose class is absent from the reference is simply wrong).
    """
    q, ql, r, rl, _ = _prepare(query, query_labels, reference, reference_labels, False)
    correct = 0
    for start, _, indices in _iter_knn(q, r, 1, False, memory_budget):
        correct += int((rl[indices[:, 0]] == ql[start : start + len(indices)]).sum())
    return correct / len(q)


class AccuracyCalculator:
    """pytorch-metric-learning's ``AccuracyCalculator`` without faiss: same call, metric names and values.

    ``get_accuracy(query, query_labels, reference=None, reference_labels=None, ref_includes_query=False,
    include=(), exclude=())`` returns ``{metric name: value}`` for the metrics of :data:`METRICS`
    (module docstring for the math). ``k``: neighbours retrieved per query, an int, ``"max_bin_count"`` or
    None (every reference, as PML). ``knn_func(query, k, reference, ref_includes_query) -> (distances,
    indices)`` replaces the blocked search (default: :class:`BlockedKNN`, run block by block).
    The clustering metrics NMI and AMI (k-means) are not provided.
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k=None,
        label_comparison_fn: Callable | None = None,
        device=None,
        knn_func: Callable | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self._check_names(include, "include")
        self._check_names(exclude, "exclude")
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        if not ((isinstance(k, int) and not isinstance(k, bool) and k > 0) or k in (None, "max_bin_count")):
            raise ValueError(f"k must be an integer greater than 0, or None, or 'max_bin_count', got {k!r}")
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.avg_of_avgs, self.return_per_class = avg_of_avgs, return_per_class
        self.k = k
        self.label_comparison_fn = label_comparison_fn
        self.device = None if device is None else torch.device(device)
        self.knn_func = knn_func
        self.memory_budget = memory_budget

    @staticmethod
    def _check_names(names, argument: str) -> None:
        if not isinstance(names, (tuple, list)):
            raise TypeError(f"{argument} must be a tuple or list of metric names, got {type(names).__name__}")
        for name in names:
            if name in _CLUSTERING:
                raise ValueError(
                    f"{argument}: {name} needs k-means clustering, which fastdml's "
                    "AccuracyCalculator does not provide; use pytorch-metric-learning's with faiss"
                )
            if name not in METRICS:
                raise ValueError(f"{argument}: unknown metric {name!r}; metrics are {METRICS}")

    def get_curr_metrics(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
        include = include or self.include or METRICS
        exclude = tuple(exclude) or self.exclude
        return [name for name in METRICS if name in include and name not in exclude]

    def _determine_k(self, r_max: int, available: int):
        if self.k is None:
            return available
        if self.k == "max_bin_count":
            return max(1, r_max)
        return min(self.k, available)

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict:
        """``{metric: value}`` of ``query`` against ``reference`` (None: the queries themselves, leave-one-out)."""
        self._check_names(include, "include")
        self._check_names(exclude, "exclude")
        q, ql, r, rl, inc = _prepare(query, query_labels, reference, reference_labels, ref_includes_query, self.device)
        names = self.get_curr_metrics(include, exclude)
        if not names:
            return {}
        counts = _relevant_counts(ql, rl, inc, self.label_comparison_fn)
        k = self._determine_k(int(counts.max()), len(r) - int(inc))
        return _evaluate(
            q,
            ql,
            r,
            rl,
            inc,
            names,
            k,
            knn_func=self.knn_func,
            compare=self.label_comparison_fn,
            avg_of_avgs=self.avg_of_avgs,
            return_per_class=self.return_per_class,
            memory_budget=self.memory_budget,
        )

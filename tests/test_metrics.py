"""fastdml.metrics against brute force and against pytorch-metric-learning's AccuracyCalculator.

PML's calculator is the oracle for the metric definitions; it is given a plain torch kNN (full distance
matrix + sort) as ``knn_func`` so faiss is not needed. fastdml's side runs its blocked search with a tiny
memory budget, so every query block is a few rows and the block seams are exercised.
"""

import math

import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PMLAccuracyCalculator

from fastdml.metrics import METRICS, AccuracyCalculator, BlockedKNN, knn, knn_accuracy, retrieval_metrics

TINY_BUDGET = 4096  # bytes: forces blocks of one or a few query rows


def close(name, value, nan_ok=False):
    """PML computes MRR in float32, the other metrics in float64."""
    rel = 1e-6 if name == "mean_reciprocal_rank" else 1e-12
    return pytest.approx(value, rel=rel, abs=rel, nan_ok=nan_ok)


def brute_knn(query, k, reference, ref_includes_query):
    """Full distance matrix in float64, self excluded by index, stable sort (the oracle kNN)."""
    dist = torch.cdist(query.double(), reference.double())
    if ref_includes_query:
        dist[torch.arange(len(query)), torch.arange(len(query))] = math.inf
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return torch.gather(dist, 1, order), order


def labels_of(kind, n, generator):
    if kind == "balanced":
        return torch.arange(n) % 5
    if kind == "imbalanced":  # class sizes differ a lot, one class has a single member (a lone query)
        y = torch.randint(0, 3, (n,), generator=generator)
        y[: n // 2] = 3
        y[-1] = 7
        return y
    if kind == "two_classes":
        return (torch.rand(n, generator=generator) < 0.3).long()
    raise ValueError(kind)


def make(n, m, d, kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    r = torch.randn(m, d, generator=g)
    return q, labels_of(kind, n, g), r, labels_of(kind, m, g)


@pytest.mark.parametrize("d", [1, 2, 3, 40])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_blocked_knn_matches_brute_force(d, ref_includes_query):
    q, _, r, _ = make(37, 53, d, "balanced", seed=d)
    if ref_includes_query:
        r = torch.cat([q, r])
    k = 11
    dist, idx = knn(q, r, k, ref_includes_query, memory_budget=TINY_BUDGET)
    want_d, want_i = brute_knn(q, k, r, ref_includes_query)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(dist.double(), want_d, atol=1e-5, rtol=1e-5)
    if ref_includes_query:
        assert not (idx == torch.arange(len(q))[:, None]).any()


def test_blocked_knn_float64_is_exact():
    q, _, r, _ = make(20, 30, 3, "balanced", seed=1)
    dist, idx = knn(q.double(), r.double(), 30, memory_budget=TINY_BUDGET)
    want_d, want_i = brute_knn(q, 30, r, False)
    assert dist.dtype == torch.float64 and torch.equal(idx, want_i)
    torch.testing.assert_close(dist, want_d, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["balanced", "imbalanced", "two_classes"])
@pytest.mark.parametrize("k", [None, "max_bin_count", 3])
@pytest.mark.parametrize("separate_reference", [False, True])
@pytest.mark.parametrize("averaging", ["micro", "avg_of_avgs", "return_per_class"])
def test_accuracy_calculator_matches_pml(kind, k, separate_reference, averaging):
    q, ql, r, rl = make(61, 83, 2, kind, seed=7)
    options = dict(avg_of_avgs=averaging == "avg_of_avgs", return_per_class=averaging == "return_per_class", k=k)
    ours = AccuracyCalculator(memory_budget=TINY_BUDGET, **options)
    oracle = PMLAccuracyCalculator(include=METRICS, knn_func=brute_knn, device=torch.device("cpu"), **options)
    args = (q, ql, r, rl, False) if separate_reference else (q, ql)
    got = ours.get_accuracy(*args)
    want = oracle.get_accuracy(*args)
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name] == close(name, want[name], nan_ok=True), name


def test_accuracy_calculator_with_reference_that_includes_the_queries():
    q, ql, r, rl = make(40, 50, 3, "imbalanced", seed=3)
    ref, ref_labels = torch.cat([q, r]), torch.cat([ql, rl])
    ours = AccuracyCalculator(memory_budget=TINY_BUDGET).get_accuracy(q, ql, ref, ref_labels, True)
    want = PMLAccuracyCalculator(include=METRICS, knn_func=brute_knn, device=torch.device("cpu")).get_accuracy(
        q, ql, ref, ref_labels, True
    )
    for name in METRICS:
        assert ours[name] == close(name, want[name]), name


def test_include_exclude_and_custom_knn_func():
    q, ql, _, _ = make(30, 1, 2, "balanced", seed=5)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision"), exclude=("r_precision",), knn_func=BlockedKNN(TINY_BUDGET)
    )
    got = calc.get_accuracy(q, ql)
    want = PMLAccuracyCalculator(
        include=("precision_at_1",), knn_func=brute_knn, device=torch.device("cpu")
    ).get_accuracy(q, ql)
    assert list(got) == ["precision_at_1"]
    assert got["precision_at_1"] == pytest.approx(want["precision_at_1"], abs=1e-12)
    assert list(calc.get_accuracy(q, ql, include=("mean_reciprocal_rank",))) == ["mean_reciprocal_rank"]


def test_label_comparison_fn_matches_pml():
    q, ql, r, rl = make(33, 44, 2, "balanced", seed=9)

    def same_parity(a, b):
        return (a % 2) == (b % 2)

    got = AccuracyCalculator(label_comparison_fn=same_parity, memory_budget=TINY_BUDGET).get_accuracy(q, ql, r, rl)
    want = PMLAccuracyCalculator(
        include=METRICS, label_comparison_fn=same_parity, knn_func=brute_knn, device=torch.device("cpu")
    ).get_accuracy(q, ql, r, rl)
    for name in METRICS:
        assert got[name] == close(name, want[name]), name


@pytest.mark.parametrize("d", [2, 24])
def test_retrieval_metrics_leave_one_out_match_pml(d):
    q, ql, _, _ = make(150, 1, d, "imbalanced", seed=d)
    got = retrieval_metrics(q, ql, memory_budget=TINY_BUDGET)
    want = PMLAccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=brute_knn,
        device=torch.device("cpu"),
    ).get_accuracy(q, ql)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_perfectly_separated_classes_score_one_and_shuffled_labels_do_not():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = 100.0 * torch.nn.functional.one_hot(y, 4).float() + torch.randn(200, 4, generator=g)
    good = retrieval_metrics(x, y)
    assert all(value == 1.0 for value in good.values())
    bad = retrieval_metrics(x, y[torch.randperm(200, generator=g)])
    assert all(value < 0.6 for value in bad.values())


def test_knn_accuracy_matches_brute_force_and_counts_unmatched_classes_as_wrong():
    q, ql, r, rl = make(70, 90, 2, "balanced", seed=11)
    ql[:5] = 9  # a class absent from the reference: those queries are simply wrong
    nearest = torch.cdist(q.double(), r.double()).argmin(dim=1)
    want = (rl[nearest] == ql).double().mean().item()
    assert knn_accuracy(q, ql, r, rl, memory_budget=TINY_BUDGET) == pytest.approx(want, abs=1e-12)


def test_all_lone_queries_give_nan():
    q = torch.randn(4, 2)
    y = torch.arange(4)
    assert all(math.isnan(v) for v in retrieval_metrics(q, y).values())


def test_bad_inputs_raise_clear_errors():
    q, ql, r, rl = make(10, 12, 2, "balanced", seed=0)
    with pytest.raises(ValueError, match="query must be 2-D"):
        retrieval_metrics(q[0], ql)
    with pytest.raises(ValueError, match="query_labels has length 9"):
        retrieval_metrics(q, ql[:9])
    with pytest.raises(ValueError, match="reference_labels has length 11"):
        knn_accuracy(q, ql, r, rl[:11])
    with pytest.raises(ValueError, match="dimension"):
        knn_accuracy(q, ql, r[:, :1], rl)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((3, 2), float("nan")), ql[:3])
    with pytest.raises(ValueError, match="ref_includes_query"):
        AccuracyCalculator().get_accuracy(q, ql, r, rl, True)
    with pytest.raises(ValueError, match="unknown metric"):
        AccuracyCalculator(include=("precision_at_2",))
    with pytest.raises(ValueError, match="k-means"):
        AccuracyCalculator(include=("NMI",))
    with pytest.raises(ValueError, match="k must be"):
        AccuracyCalculator(k=0)
    with pytest.raises(ValueError, match="mutually exclusive"):
        AccuracyCalculator(avg_of_avgs=True, return_per_class=True)
    with pytest.raises(ValueError, match="k must be in"):
        knn(q, r, 13)

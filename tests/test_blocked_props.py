"""Property tests of the blocked stats ops: random sizes, labels, kinds, margins, bands and windows
(hypothesis), each against the float64 reference (values and gradients)."""

import math

import pytest
import torch

from fastdml.config import memory_budget

from .blocked_cases import check_stats, make_inputs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INF = math.inf

bounds = st.one_of(st.just(-INF), st.floats(-1.0, 1.0))
uppers = st.one_of(st.just(INF), st.floats(0.0, 2.0))
shapes = st.tuples(
    st.integers(1, 23),
    st.integers(1, 6),
    st.booleans(),
    st.sampled_from(["random", "one", "distinct", "imbalanced", "pk"]),
    st.sampled_from(["l2", "sql2", "dot"]),
    st.integers(0, 2**16),
    st.sampled_from([0.002, 0.02, 64.0]),
)


@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    pm=st.floats(-0.5, 1.0),
    nm=st.floats(0.0, 2.5),
    pos_lo=bounds,
    neg_hi=uppers,
    low=st.one_of(st.just(-INF), st.just(0.0), st.floats(0.0, 0.5)),
    high=uppers,
)
def test_contrastive_property(shape, pm, nm, pos_lo, neg_hi, low, high):
    n, d, square, pattern, kind, seed, mb = shape
    x, y, r, z, excl = make_inputs(n, d, torch.float64, square, pattern, seed=seed)
    with memory_budget(mb):
        check_stats("contrastive", x, y, r, z, excl, kind, (pm, nm, pos_lo, neg_hi, low, high))


@settings(max_examples=25, deadline=None)
@given(
    shape=shapes,
    margin=st.floats(0.0, 1.0),
    smooth=st.booleans(),
    band_lo=bounds,
    band_hi=uppers,
    low=st.one_of(st.just(-INF), st.just(0.0), st.floats(0.0, 0.5)),
    high=uppers,
)
def test_triplet_property(shape, margin, smooth, band_lo, band_hi, low, high):
    n, d, square, pattern, kind, seed, mb = shape
    x, y, r, z, excl = make_inputs(n, d, torch.float64, square, pattern, seed=seed)
    with memory_budget(mb):
        check_stats("triplet", x, y, r, z, excl, kind, (margin, smooth, band_lo, band_hi, low, high))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, margin=st.floats(0.0, 1.0))
def test_semihard_property(shape, margin):
    n, d, square, pattern, kind, seed, mb = shape
    x, y, r, z, excl = make_inputs(n, d, torch.float64, square, pattern, seed=seed)
    with memory_budget(mb):
        check_stats("semihard", x, y, r, z, excl, kind, (margin,))

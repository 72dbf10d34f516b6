"""The lazy mined result: a PML tuple on every read, fused (never listed) when a fastdml loss consumes it."""

import copy
import pickle

import pytest
import torch

from fastdml import distances as D
from fastdml import losses as L
from fastdml import miners as M
from fastdml.lazy import LazyIndices
from tests import api_cases as _cases
from tests.api_cases import (
    assert_close_to_pml,
    batch,
    loss_and_grads,
    pml_losses,
    pml_miners,
    same_indices,
)

backend = _cases.backend  # the fixture: every available backend


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
        lambda m: m.TripletMarginMiner(margin=0.2),
        lambda m: m.PairMarginMiner(pos_margin=0.4, neg_margin=0.9),
    ],
)
def test_lazy_result_reads_as_pml_tuple(backend, make):
    x, y = batch(n=16, d=3, classes=3, seed=0)
    got = make(M)(x, y)
    want = make(pml_miners)(x, y)
    assert isinstance(got, LazyIndices) and isinstance(got, tuple)
    assert len(got) == len(want) and not got.is_materialized  # len needs no listing
    assert bool(got)
    # unpacking, indexing, slicing, iteration, conversion
    parts = tuple(got)
    assert got.is_materialized
    assert same_indices(parts, want)
    assert same_indices((got[0], got[1]), want[:2]) and same_indices(got[1:], want[1:])
    assert same_indices(list(iter(got)), want)
    first, *rest = got
    assert torch.equal(first, want[0]) and len(rest) == len(want) - 1
    assert all(t.dtype == torch.int64 for t in got)
    # equality with tuples as PML's: the same tensor objects compare equal
    assert got == parts and not (got != parts)
    # device moves return the plain tuple
    assert same_indices(got.to("cpu"), want) and same_indices(got.cpu(), want)
    # copies and pickles are plain tuples with the same content
    assert same_indices(pickle.loads(pickle.dumps(got)), want)
    assert same_indices(copy.deepcopy(got), want)
    assert same_indices(got + (), want)


def test_lazy_counts_without_listing(backend):
    x, y = batch(n=16, d=3, classes=3, seed=1)
    miner = M.TripletMarginMiner(margin=0.25, type_of_triplets="hard")
    res = miner(x, y)
    n = miner.num_triplets
    assert not res.is_materialized
    assert n == len(pml_miners.TripletMarginMiner(margin=0.25, type_of_triplets="hard")(x, y)[0])
    pmm = M.PairMarginMiner()
    res = pmm(x, y)
    counts = (pmm.num_pos_pairs, pmm.num_neg_pairs)
    assert not res.is_materialized
    want = pml_miners.PairMarginMiner()(x, y)
    assert counts == (len(want[0]), len(want[2]))


@pytest.mark.parametrize(
    "make_miner,make_loss",
    [
        (lambda: M.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"), lambda: L.TripletMarginLoss(0.1)),
        (lambda: M.TripletMarginMiner(margin=0.3, type_of_triplets="easy"), lambda: L.TripletMarginLoss(0.5)),
        (lambda: M.PairMarginMiner(), lambda: L.ContrastiveLoss()),
        (lambda: M.BatchHardMiner(), lambda: L.TripletMarginLoss(0.3)),
        (lambda: M.BatchHardMiner(), lambda: L.ContrastiveLoss(0.1)),
        (lambda: M.BatchEasyHardMiner(), lambda: L.TripletMarginLoss(0.3)),
        (lambda: M.BatchEasyHardMiner(pos_strategy="semihard", neg_strategy="easy"), lambda: L.ContrastiveLoss()),
    ],
)
def test_fastdml_loss_fuses_lazy_result_without_listing(backend, make_miner, make_loss):
    x, y = batch(n=18, d=3, classes=3, seed=2)
    xl = x.clone().requires_grad_(True)
    res = make_miner()(xl, y)
    fused = make_loss()(xl, y, res)
    assert not res.is_materialized  # evaluated by a stats sweep, nothing listed
    (g_fused,) = torch.autograd.grad(fused, xl)
    # the same loss on the listed tuple
    listed = make_loss()(xl, y, tuple(res))
    (g_listed,) = torch.autograd.grad(listed, xl)
    torch.testing.assert_close(fused, listed, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_fused, g_listed, atol=1e-12, rtol=1e-10)


def test_lazy_result_is_not_fused_on_other_embeddings(backend):
    x, y = batch(n=14, d=3, classes=3, seed=3)
    other = x.clone()
    res = M.TripletMarginMiner(margin=0.3)(x, y)
    got = L.TripletMarginLoss(margin=0.1)(other, y, res)
    assert res.is_materialized  # another tensor: the indices are read and used as given
    want = pml_losses.TripletMarginLoss(margin=0.1)(other, y, pml_miners.TripletMarginMiner(margin=0.3)(x, y))
    torch.testing.assert_close(got, want)


def test_lazy_result_is_not_fused_after_in_place_change(backend):
    # the embeddings changed in place since mining: the loss must not fuse (the fused sweep would see the new
    # values); the indices are listed on first read and used as given
    x, y = batch(n=14, d=3, classes=3, seed=4)
    res = M.TripletMarginMiner(margin=0.3)(x, y)
    x.mul_(1.5)
    got = L.TripletMarginLoss(margin=0.1)(x, y, res)
    assert res.is_materialized
    torch.testing.assert_close(got, pml_losses.TripletMarginLoss(margin=0.1)(x, y, tuple(res)))


def test_lazy_result_not_fused_with_a_different_distance(backend):
    x, y = batch(n=14, d=3, classes=3, seed=5)
    res = M.TripletMarginMiner(margin=0.3)(x, y)  # mined with LpDistance
    loss = L.TripletMarginLoss(margin=0.1, distance=D.CosineSimilarity())
    got = loss(x, y, res)
    assert res.is_materialized
    torch.testing.assert_close(got, loss(x, y, tuple(res)))


def test_pml_loss_accepts_lazy_result(backend):
    x, y = batch(n=16, d=3, classes=3, seed=6)
    for make_m, make_l in [
        (lambda m: m.TripletMarginMiner(margin=0.3), lambda: pml_losses.TripletMarginLoss(margin=0.1)),
        (lambda m: m.PairMarginMiner(), lambda: pml_losses.ContrastiveLoss()),
        (lambda m: m.BatchHardMiner(), lambda: pml_losses.TripletMarginLoss(margin=0.1)),
    ]:
        got = loss_and_grads(lambda e, ml=make_l, mm=make_m: ml()(e, y, mm(M)(e, y)), x)
        want = loss_and_grads(lambda e, ml=make_l, mm=make_m: ml()(e, y, mm(pml_miners)(e, y)), x)
        assert_close_to_pml(got, want, torch.float64)


def test_lazy_repr_and_arity_checks():
    res = LazyIndices(3, lambda: (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert "not yet listed" in repr(res)
    res.materialize()
    assert "tensor" in repr(res)
    with pytest.raises(ValueError):
        LazyIndices(3, value=(torch.tensor([0]),))
    bad = LazyIndices(4, lambda: (torch.tensor([0]),))
    with pytest.raises(RuntimeError):
        bad.materialize()


def test_miner_counts_do_not_keep_the_embeddings_alive(backend):
    import gc
    import weakref

    x, y = batch(n=12, d=3, classes=3, seed=7)
    want = len(pml_miners.TripletMarginMiner(margin=0.3)(x, y)[0])
    miner = M.TripletMarginMiner(margin=0.3)
    emb = x.clone().requires_grad_(True)
    res = miner(emb, y)
    alive = weakref.ref(emb)
    del res, emb
    gc.collect()
    assert alive() is None
    assert miner.num_triplets == want  # counted by the sweep over the (detached) inputs it kept


def test_c_level_tensor_list_arguments_need_a_plain_tuple():
    # documented caveat: the lazy tuple's own storage is empty, so torch's tensor-list parsers raise (never
    # silently use an empty list); tuple(result) is the remedy
    res = LazyIndices(3, lambda: (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2])))
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        torch.stack(res)
    assert torch.equal(torch.stack(tuple(res)), torch.tensor([[0, 1], [1, 0], [2, 2]]))

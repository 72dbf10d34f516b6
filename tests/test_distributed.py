"""DistributedLossWrapper / DistributedMinerWrapper on 2 gloo processes (CPU) against one process.

One spawn of 2 ranks (module fixture, bounded in time) runs every scenario; each rank holds the full batch E
as a "parameter" and feeds its slice E[lo:hi] to the wrapper, backprops an upstream gradient, and averages
dL/dE over the ranks as DDP does. The expected values are the public loss on the concatenated batch under
``use_backend("reference")`` (one process). Float64 throughout, so the tolerance is float64's.
"""

from __future__ import annotations

import io
import math
import os
import socket
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import fastdml
from fastdml.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

from .conftest import TOL

WORLD = 2
TIMEOUT_S = 120
D = 5
UPSTREAM = 0.7  # the random-ish upstream gradient backpropagated through every loss

# sizes per rank: even and uneven
SIZES = {"even": (8, 8), "uneven": (9, 5)}
# (loss spec, miner spec or None)
LOSSES = {
    "contrastive": ("contrastive", None),
    "contrastive_mean_reducer": ("contrastive_mean", None),
    "batch_all": ("triplet", None),
    "batch_hard": ("triplet", "batch_hard"),
    "contrastive_pairmargin": ("contrastive", "pair_margin"),
    "batch_hard_one_pass": ("batch_hard_loss", None),
    "semihard_one_pass": ("semihard_loss", None),
}
BACKENDS = ("auto", "reference")


def _make_loss(spec):
    from fastdml import losses, reducers

    if spec == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6)
    if spec == "contrastive_mean":
        return losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.6, reducer=reducers.MeanReducer())
    if spec == "triplet":
        return losses.TripletMarginLoss(margin=0.6)
    if spec == "batch_hard_loss":
        return losses.BatchHardTripletLoss(margin=0.5)
    if spec == "semihard_loss":
        return losses.SemiHardTripletLoss(margin=0.5)
    raise ValueError(spec)


def _make_miner(spec):
    from fastdml import miners

    if spec is None:
        return None
    if spec == "batch_hard":
        return miners.BatchHardMiner()
    if spec == "pair_margin":
        return miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.5)
    if spec == "semihard":
        return miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")
    raise ValueError(spec)


def _make_cbm():
    from fastdml import losses
    from fastdml.cross_batch_memory import CrossBatchMemory

    return CrossBatchMemory(losses.TripletMarginLoss(margin=0.6), D, memory_size=24)


DDP_CASES = [("contrastive", False), ("contrastive", True), ("batch_hard", True), ("batch_all", True)]


def _ddp_model():
    torch.manual_seed(1)  # the same initial weights on every rank (DDP also broadcasts them)
    return torch.nn.Linear(D, D).double()


def _data(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    # scaled so that distances (~0.5) and margins are comparable: every term type is active and a self
    # comparison (distance 0) would change sums and counts
    e = 0.15 * torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return e, y


# a rank with no rows at all (the collectives still run; its loss value is the global one)
EMPTY_RANK = {"empty_rank": (10, 0)}


def _scenarios():
    out = []
    for size_name in SIZES:
        for loss_name in LOSSES:
            for efficient in (False, True):
                for backend in BACKENDS:
                    out.append((size_name, loss_name, efficient, backend))
    for loss_name in ("contrastive_mean_reducer", "batch_all", "batch_hard"):
        for efficient in (False, True):
            out.append(("empty_rank", loss_name, efficient, "auto"))
    return out


def _single(loss_name, e, y):
    """One process on the concatenated batch: (value, dL/dE * UPSTREAM) under the reference backend."""
    loss_spec, miner_spec = LOSSES[loss_name]
    loss, miner = _make_loss(loss_spec), _make_miner(miner_spec)
    with fastdml.use_backend("reference"):
        e = e.clone().requires_grad_(True)
        idx = None if miner is None else miner(e, y)
        val = loss(e, y, idx)
        (val * UPSTREAM).backward()
    return val.detach(), e.grad


def _rank_main(rank, world, port, scenarios, result_queue):
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        results = {}
        for sc in scenarios:
            size_name, loss_name, efficient, backend = sc
            sizes = {**SIZES, **EMPTY_RANK}[size_name]
            e_full, y_full = _data(sizes)
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            loss_spec, miner_spec = LOSSES[loss_name]
            wrapper = DistributedLossWrapper(_make_loss(loss_spec), efficient=efficient)
            miner = _make_miner(miner_spec)
            mwrap = None if miner is None else DistributedMinerWrapper(miner, efficient=efficient)
            with fastdml.use_backend(backend), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                e = e_full.clone().requires_grad_(True)
                emb, lab = e[lo:hi], y_full[lo:hi]
                idx = None if mwrap is None else mwrap(emb, lab)
                val = wrapper(emb, lab, idx)
                (val * UPSTREAM).backward()
            fallbacks = sum("no fused rectangular path" in str(w.message) for w in caught)
            grad = e.grad if e.grad is not None else torch.zeros_like(e)
            torch.distributed.all_reduce(grad)
            grad /= world  # DDP's averaging
            results[sc] = (val.detach().clone(), grad.clone(), fallbacks)
        # cross-batch memory behind the wrapper: 3 steps (the ring of 24 wraps), the queue filled from every rank
        for size_name in SIZES:
            sizes = SIZES[size_name]
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            wrapper = DistributedLossWrapper(_make_cbm())
            steps = []
            for step in range(3):
                e_full, y_full = _data(sizes, seed=10 + step)
                e = e_full.clone().requires_grad_(True)
                val = wrapper(e[lo:hi], y_full[lo:hi])
                (val * UPSTREAM).backward()
                grad = e.grad.clone()
                torch.distributed.all_reduce(grad)
                grad /= world
                steps.append((val.detach().clone(), grad))
            results[("cbm", size_name)] = steps
        # ref_emb (a second view per row, same labels) and bool labels
        for size_name in SIZES:
            sizes = SIZES[size_name]
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            e_full, y_full = _data(sizes)
            r_full, _ = _data(sizes, seed=7)
            for efficient in (False, True):
                wrapper = DistributedLossWrapper(_make_loss("contrastive_mean"), efficient=efficient)
                e = e_full.clone().requires_grad_(True)
                r = r_full.clone().requires_grad_(True)
                val = wrapper(e[lo:hi], y_full[lo:hi], None, r[lo:hi], y_full[lo:hi].clone())
                (val * UPSTREAM).backward()
                grads = torch.cat([e.grad, r.grad], 1)
                torch.distributed.all_reduce(grads)
                grads /= world
                results[("ref_emb", size_name, efficient)] = (val.detach().clone(), grads)
            wrapper = DistributedLossWrapper(_make_loss("contrastive_mean"), efficient=True)
            e = e_full.clone().requires_grad_(True)
            val = wrapper(e[lo:hi], (y_full[lo:hi] % 2) == 0)
            (val * UPSTREAM).backward()
            grad = e.grad.clone()
            torch.distributed.all_reduce(grad)
            grad /= world
            results[("bool_labels", size_name)] = (val.detach().clone(), grad)
        # a real DistributedDataParallel model: its averaged parameter gradients against one process
        for loss_name, efficient in DDP_CASES:
            sizes = SIZES["uneven"]
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            x_full, y_full = _data(sizes, seed=5)
            model = _ddp_model()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            loss_spec, miner_spec = LOSSES[loss_name]
            wrapper = DistributedLossWrapper(_make_loss(loss_spec), efficient=efficient)
            miner = _make_miner(miner_spec)
            mwrap = None if miner is None else DistributedMinerWrapper(miner, efficient=efficient)
            emb = ddp(x_full[lo:hi])
            idx = None if mwrap is None else mwrap(emb, y_full[lo:hi])
            val = wrapper(emb, y_full[lo:hi], idx)
            val.backward()
            results[("ddp", loss_name, efficient)] = (
                val.detach().clone(),
                [p.grad.clone() for p in model.parameters()],
            )
        # miner outputs, mapped to global indices (PML's pool order: this rank first, then the others)
        for size_name in SIZES:
            sizes = SIZES[size_name]
            e_full, y_full = _data(sizes)
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            order = [rank] + [q for q in range(world) if q != rank]
            starts = [sum(sizes[:q]) for q in range(world)]
            pool_to_global = torch.cat([torch.arange(starts[q], starts[q] + sizes[q]) for q in order])
            for efficient in (False, True):
                mw = DistributedMinerWrapper(_make_miner("semihard"), efficient=efficient)
                a, p, n = mw(e_full[lo:hi], y_full[lo:hi])
                ga = a + lo if efficient else pool_to_global[a]
                results[("miner", size_name, efficient)] = torch.stack([ga, pool_to_global[p], pool_to_global[n]], 1)
        result_queue.put((rank, _to_bytes(results), None))
    except Exception:
        result_queue.put((rank, None, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _to_bytes(obj):
    # tensors through a multiprocessing queue travel as shared-memory handles that die with the sender
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(target, args, world=WORLD, timeout=TIMEOUT_S):
    """Run ``target(rank, world, port, *args, queue)`` on ``world`` spawned processes; per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, res, err = queue.get(timeout=timeout)
            if err is not None:
                errors.append(f"rank {rank}:\n{err}")
            results[rank] = None if res is None else torch.load(io.BytesIO(res), weights_only=False)
    except Exception as exc:  # queue.Empty: a rank hung (e.g. mismatched collectives)
        errors.append(f"timed out after {timeout} s waiting for the ranks ({exc!r})")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors))
    return results


@pytest.fixture(scope="module")
def world_results():
    return run_world(_rank_main, (_scenarios(),))


@pytest.mark.parametrize("sc", _scenarios(), ids=lambda sc: "-".join(map(str, sc)))
def test_distributed_loss_and_ddp_gradient_equal_single_process(world_results, sc):
    size_name, loss_name, efficient, backend = sc
    e, y = _data({**SIZES, **EMPTY_RANK}[size_name])
    want_val, want_grad = _single(loss_name, e, y)
    tol = TOL[torch.float64]
    assert want_grad.abs().max() > 0  # the scenario exercises a non-trivial gradient
    for rank in range(WORLD):
        val, grad, fallbacks = world_results[rank][sc]
        torch.testing.assert_close(val, want_val, **tol)
        torch.testing.assert_close(grad, want_grad, **tol)
        # efficient=True ran this rank's anchors against the pool (no recomputation on the whole pool)
        assert fallbacks == 0


def _sorted_rows(t):
    if t.numel() == 0:
        return t
    key = t[:, 0] * 10**8 + t[:, 1] * 10**4 + t[:, 2]
    return t[torch.argsort(key)]


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_distributed_miner_returns_the_single_process_tuples(world_results, size_name, efficient):
    sizes = SIZES[size_name]
    e, y = _data(sizes)
    with fastdml.use_backend("reference"):
        a, p, n = _make_miner("semihard")(e, y)
    want = torch.stack([a, p, n], 1)
    assert want.shape[0] > 0
    got_all = []
    for rank in range(WORLD):
        got = world_results[rank][("miner", size_name, efficient)]
        if efficient:
            # local anchors only: this rank's share of the single-process tuples
            lo = sum(sizes[:rank])
            mine = want[(want[:, 0] >= lo) & (want[:, 0] < lo + sizes[rank])]
            assert torch.equal(_sorted_rows(got), _sorted_rows(mine))
            got_all.append(got)
        else:
            assert torch.equal(_sorted_rows(got), _sorted_rows(want))
    if efficient:
        assert torch.equal(_sorted_rows(torch.cat(got_all)), _sorted_rows(want))


def test_wrapper_outside_distributed_warns_and_returns_the_loss():
    e, y = _data((6,))
    loss = _make_loss("contrastive")
    with pytest.warns(UserWarning, match="non-distributed"):
        got = DistributedLossWrapper(loss)(e, y)
    torch.testing.assert_close(got, loss(e, y), **TOL[torch.float64])
    assert not math.isnan(float(got))


@pytest.mark.parametrize("size_name", list(SIZES))
def test_distributed_cross_batch_memory_equals_single_process(world_results, size_name):
    """DistributedLossWrapper(CrossBatchMemory): every rank's memory receives the whole global batch, and the
    loss and DDP-averaged gradient equal one process's CrossBatchMemory fed the concatenated batches."""
    sizes = SIZES[size_name]
    single = _make_cbm()
    for step in range(3):
        e, y = _data(sizes, seed=10 + step)
        e = e.clone().requires_grad_(True)
        with fastdml.use_backend("reference"):
            want = single(e, y)
        (want * UPSTREAM).backward()
        assert float(want.detach()) > 0
        for rank in range(WORLD):
            val, grad = world_results[rank][("cbm", size_name)][step]
            torch.testing.assert_close(val, want.detach(), **TOL[torch.float64])
            torch.testing.assert_close(grad, e.grad, **TOL[torch.float64])


@pytest.mark.parametrize("case", DDP_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_ddp_parameter_gradients_equal_single_process(world_results, case):
    """A Linear model in DistributedDataParallel (gloo, uneven batches): the loss and the parameter gradients
    after DDP's averaging equal one process on the concatenated batch."""
    loss_name, efficient = case
    x, y = _data(SIZES["uneven"], seed=5)
    model = _ddp_model()
    loss_spec, miner_spec = LOSSES[loss_name]
    loss, miner = _make_loss(loss_spec), _make_miner(miner_spec)
    with fastdml.use_backend("reference"):
        emb = model(x)
        idx = None if miner is None else miner(emb, y)
        want = loss(emb, y, idx)
    want.backward()
    for rank in range(WORLD):
        val, grads = world_results[rank][("ddp", loss_name, efficient)]
        torch.testing.assert_close(val, want.detach(), **TOL[torch.float64])
        for got, p in zip(grads, model.parameters()):
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(got, p.grad, **TOL[torch.float64])


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_distributed_ref_emb_follows_pml_semantics(world_results, size_name, efficient):
    """With ref_emb: efficient=False is the loss of all embeddings against all references (nothing excluded);
    efficient=True also skips each anchor's own reference row, as PML's get_indices_tuple does (the single-process
    equivalent is ``ref_labels is labels``)."""
    sizes = SIZES[size_name]
    e, y = _data(sizes)
    r, _ = _data(sizes, seed=7)
    e = e.clone().requires_grad_(True)
    r = r.clone().requires_grad_(True)
    with fastdml.use_backend("reference"):
        want = _make_loss("contrastive_mean")(e, y, None, r, y if efficient else y.clone())
    (want * UPSTREAM).backward()
    want_grad = torch.cat([e.grad, r.grad], 1)
    for rank in range(WORLD):
        val, grads = world_results[rank][("ref_emb", size_name, efficient)]
        torch.testing.assert_close(val, want.detach(), **TOL[torch.float64])
        torch.testing.assert_close(grads, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("size_name", list(SIZES))
def test_distributed_bool_labels(world_results, size_name):
    e, y = _data(SIZES[size_name])
    e = e.clone().requires_grad_(True)
    with fastdml.use_backend("reference"):
        want = _make_loss("contrastive_mean")(e, (y % 2) == 0)
    (want * UPSTREAM).backward()
    for rank in range(WORLD):
        val, grad = world_results[rank][("bool_labels", size_name)]
        torch.testing.assert_close(val, want.detach(), **TOL[torch.float64])
        torch.testing.assert_close(grad, e.grad, **TOL[torch.float64])

"""PML's extension API after the import switch: user subclasses of the base classes (losses, miners, distances,
reducers) written against PML work unchanged on fastdml's classes and give PML's numbers; the hooks called
directly return what PML's return; ``collect_stats=None`` follows the global switches with PML's statistics;
CrossBatchMemory has PML's attributes and semantics with an inner miner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.utils import common_functions as pml_cf

from fastdml import distances, losses, miners, reducers
from fastdml.utils import common_functions as fd_cf

from .label_patterns import labels as _labels

D = 8


def _batch(n=24, pattern="pk", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    return x, _labels(pattern, n, g)


def _close(a, b, tol=1e-10):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def _same_tuple(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert s.dtype == torch.int64 and torch.equal(s.cpu(), t.cpu())


# ---- one body, two bases: the user's code is the same for PML and fastdml ----
def _make_custom_loss(base):
    class SquaredContrast(base):
        """Mean squared distance of positive pairs plus a hinge on negative pairs (a user's PML-style loss)."""

        def __init__(self, margin=1.5, **kwargs):
            super().__init__(**kwargs)
            self.margin = margin

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            mat = self.distance(embeddings, ref_emb)
            same = labels[:, None] == ref_labels[None, :]
            if ref_emb is embeddings:
                same.fill_diagonal_(False)
            a1, p = torch.where(same)
            a2, n = torch.where(~(labels[:, None] == ref_labels[None, :]))
            return {
                "pos": {"losses": mat[a1, p] ** 2, "indices": (a1, p), "reduction_type": "pos_pair"},
                "neg": {"losses": F.relu(self.margin - mat[a2, n]), "indices": (a2, n), "reduction_type": "neg_pair"},
            }

        def _sub_loss_names(self):
            return ["pos", "neg"]

        def get_default_reducer(self):
            return (reducers if base is losses.BaseMetricLossFunction else pml_reducers).SumReducer()

    return SquaredContrast


def _make_custom_miner(base):
    class EveryOtherTriplet(base):
        """The all-triplets list of the batch against the reference, every other one (a user's miner)."""

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            same = labels[:, None] == ref_labels[None, :]
            if ref_emb is embeddings:
                same.fill_diagonal_(False)
            a, p, n = torch.where(same[:, :, None] & (labels[:, None, None] != ref_labels[None, None, :]))
            return a[::2], p[::2], n[::2]

    return EveryOtherTriplet


def _make_custom_distance(base):
    class Manhattan(base):
        def __init__(self, **kwargs):
            super().__init__(normalize_embeddings=False, **kwargs)

        def compute_mat(self, query_emb, ref_emb):
            return (query_emb[:, None, :] - ref_emb[None, :, :]).abs().sum(-1)

        def pairwise_distance(self, query_emb, ref_emb):
            return (query_emb - ref_emb).abs().sum(-1)

    return Manhattan


def _make_custom_reducer(base):
    class TopHalfMean(base):
        """The mean of the larger half of the terms, through PML's per-type hooks."""

        def element_reduction(self, losses, loss_indices, embeddings, labels):
            k = max(1, len(losses) // 2)
            return torch.topk(losses, k).values.mean()

        def pos_pair_reduction(self, losses, *args):
            return self.element_reduction(losses, *args)

        def neg_pair_reduction(self, losses, *args):
            return self.element_reduction(losses, *args)

        def triplet_reduction(self, losses, *args):
            return self.element_reduction(losses, *args)

    return TopHalfMean


@pytest.mark.parametrize("pattern", ["pk", "imbalanced", "distinct", "one"])
def test_custom_loss_subclass_matches_pml(pattern):
    x, y = _batch(pattern=pattern)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = _make_custom_loss(losses.BaseMetricLossFunction)()(xa, y)
    theirs = _make_custom_loss(pml_losses.BaseMetricLossFunction)()(xb, y)
    _close(ours, theirs)
    g = torch.randn(())
    (ours * g).backward()
    (theirs * g).backward()
    _close(xa.grad, xb.grad)


def test_custom_loss_with_ref_emb_and_labels_on_another_device_type():
    x, y = _batch(pattern="pk")
    r, yr = _batch(n=17, pattern="imbalanced", seed=3)
    ours = _make_custom_loss(losses.BaseMetricLossFunction)()(x, y, None, r, yr)
    theirs = _make_custom_loss(pml_losses.BaseMetricLossFunction)()(x, y, None, r, yr)
    _close(ours, theirs)


@pytest.mark.parametrize("loss_name", ["TripletMarginLoss", "ContrastiveLoss"])
def test_custom_miner_subclass_feeds_fastdml_and_pml_losses(loss_name):
    x, y = _batch(pattern="pk", n=20)
    ours, theirs = _make_custom_miner(miners.BaseMiner)(), _make_custom_miner(pml_miners.BaseMiner)()
    t_ours, t_theirs = ours(x, y), theirs(x, y)
    _same_tuple(t_ours, t_theirs)
    assert ours.num_triplets == theirs.num_triplets == len(t_theirs[0]) > 0
    _close(getattr(losses, loss_name)()(x, y, t_ours), getattr(pml_losses, loss_name)()(x, y, t_theirs))


def test_base_tuple_miner_is_a_base_miner():
    assert issubclass(miners.BaseTupleMiner, miners.BaseMiner)
    x, y = _batch(n=12)
    out = _make_custom_miner(miners.BaseTupleMiner)()(x, y)
    assert len(out) == 3


@pytest.mark.parametrize("base", ["BaseDistance", "LpDistance"])
def test_custom_distance_subclass_matches_pml(base):
    x, y = _batch(pattern="imbalanced")
    ours = losses.TripletMarginLoss(margin=0.5, distance=_make_custom_distance(getattr(distances, base))())
    theirs = pml_losses.TripletMarginLoss(margin=0.5, distance=_make_custom_distance(getattr(pml_distances, base))())
    _close(ours(x, y), theirs(x, y))
    m_ours = miners.BatchHardMiner(distance=_make_custom_distance(getattr(distances, base))())
    m_theirs = pml_miners.BatchHardMiner(distance=_make_custom_distance(getattr(pml_distances, base))())
    _same_tuple(tuple(m_ours(x, y)), m_theirs(x, y))


def test_custom_check_shapes_accepts_what_the_user_allows():
    class AnyShape(distances.BaseDistance):
        def compute_mat(self, query_emb, ref_emb):
            q, r = query_emb.flatten(1), ref_emb.flatten(1)
            return torch.cdist(q, r)

        def check_shapes(self, query_emb, ref_emb):
            if query_emb.ndim != 3:
                raise ValueError("want (N, K, D)")

    x = torch.randn(16, 3, 4, dtype=torch.float64)
    y = torch.arange(16) % 4
    with pytest.raises(ValueError, match="2-D"):
        losses.TripletMarginLoss()(x, y)
    got = losses.TripletMarginLoss(margin=0.3, distance=AnyShape(normalize_embeddings=False))(x, y)
    want = pml_losses.TripletMarginLoss(margin=0.3, distance=pml_distances.LpDistance(normalize_embeddings=False))(
        x.flatten(1), y
    )
    _close(got, want)
    with pytest.raises(ValueError, match="want"):
        losses.TripletMarginLoss(distance=AnyShape(normalize_embeddings=False))(x.flatten(1), y)


@pytest.mark.parametrize("loss_name", ["ContrastiveLoss", "TripletMarginLoss"])
def test_custom_reducer_subclass_matches_pml(loss_name):
    x, y = _batch(pattern="pk")
    ours = getattr(losses, loss_name)(reducer=_make_custom_reducer(reducers.BaseReducer)())
    theirs = getattr(pml_losses, loss_name)(reducer=_make_custom_reducer(pml_reducers.BaseReducer)())
    _close(ours(x, y), theirs(x, y))


def test_reducer_hooks_get_pml_arguments():
    seen = {}

    class Spy(reducers.MeanReducer):
        def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
            seen["pos"] = (len(losses), len(loss_indices), embeddings.shape, labels.shape)
            return super().pos_pair_reduction(losses, loss_indices, embeddings, labels)

    x, y = _batch(pattern="pk", n=10)
    got = losses.ContrastiveLoss(reducer=Spy())(x, y)
    want = pml_losses.ContrastiveLoss(reducer=pml_reducers.MeanReducer())(x, y)
    _close(got, want)
    n_pos = int(((y[:, None] == y[None, :]).sum() - 10).item())
    assert seen["pos"] == (n_pos, 2, x.shape, y.shape)


def test_overriding_a_contrastive_hook_takes_pmls_path_and_others_stay_fused():
    class Squared(losses.ContrastiveLoss):
        def pos_calc(self, pos_pair_dist, margin):
            return pos_pair_dist**2

    class PMLSquared(pml_losses.ContrastiveLoss):
        def pos_calc(self, pos_pair_dist, margin):
            return pos_pair_dist**2

    class Renamed(losses.ContrastiveLoss):
        pass

    x, y = _batch(pattern="imbalanced")
    _close(Squared()(x, y), PMLSquared()(x, y))
    assert not Squared()._fusable()
    assert Renamed()._fusable() and losses.ContrastiveLoss()._fusable()
    _close(Renamed()(x, y), pml_losses.ContrastiveLoss()(x, y))


def test_generic_pair_loss_subclass_matches_pml():
    def body(base):
        class PairHinge(base):
            def __init__(self, **kwargs):
                super().__init__(mat_based_loss=False, **kwargs)

            def _compute_loss(self, pos_pair, neg_pair, indices_tuple):
                return {
                    "loss": {
                        "losses": F.relu(0.8 - neg_pair),
                        "indices": indices_tuple[2:],
                        "reduction_type": "neg_pair",
                    }
                }

        return PairHinge

    x, y = _batch(pattern="pk")
    _close(body(losses.GenericPairLoss)()(x, y), body(pml_losses.GenericPairLoss)()(x, y))


@pytest.mark.parametrize("loss_name", ["ContrastiveLoss", "TripletMarginLoss"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_compute_loss_called_directly_returns_pmls_dict(loss_name, with_ref):
    x, y = _batch(pattern="pk", n=16)
    r, yr = (_batch(n=11, seed=5)) if with_ref else (x, y)
    ours = getattr(losses, loss_name)().compute_loss(x, y, None, r, yr)
    theirs = getattr(pml_losses, loss_name)().compute_loss(x, y, None, r, yr)
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k]["reduction_type"] == theirs[k]["reduction_type"]
        _close(ours[k]["losses"], theirs[k]["losses"])
        for s, t in zip(ours[k]["indices"], theirs[k]["indices"]):
            assert torch.equal(s, t)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("TripletMarginMiner", {"margin": 0.3, "type_of_triplets": "semihard"}),
        ("PairMarginMiner", {"pos_margin": 0.5, "neg_margin": 0.9}),
        ("BatchHardMiner", {}),
        ("BatchEasyHardMiner", {"pos_strategy": "easy", "neg_strategy": "hard"}),
        ("MultiSimilarityMiner", {"epsilon": 0.2}),
    ],
)
def test_mine_called_directly_returns_pmls_plain_tuple(name, kwargs):
    x, y = _batch(pattern="imbalanced")
    got = getattr(miners, name)(**kwargs).mine(x, y, x, y)
    assert type(got) is tuple
    _same_tuple(got, getattr(pml_miners, name)(**kwargs).mine(x, y, x, y))


# ---- collect_stats ----
STAT_MINERS = [
    ("TripletMarginMiner", {"margin": 0.2}, ["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist", "num_triplets"]),
    ("PairMarginMiner", {}, ["pos_pair_dist", "neg_pair_dist", "num_pos_pairs", "num_neg_pairs"]),
    (
        "BatchHardMiner",
        {},
        ["hardest_triplet", "easiest_triplet", "hardest_pos_pair", "hardest_neg_pair", "num_triplets"],
    ),
    ("BatchEasyHardMiner", {}, ["easiest_pos_pair", "hardest_neg_pair", "num_pos_pairs", "num_neg_pairs"]),
]


@pytest.mark.parametrize("switch", ["fastdml", "pml"])
@pytest.mark.parametrize("name,kwargs,stats", STAT_MINERS)
def test_global_switch_turns_on_pmls_statistics(monkeypatch, switch, name, kwargs, stats):
    monkeypatch.setattr(fd_cf if switch == "fastdml" else pml_cf, "COLLECT_STATS", True)
    x, y = _batch(pattern="pk")
    ours = getattr(miners, name)(**kwargs)
    monkeypatch.setattr(pml_cf, "COLLECT_STATS", True)
    theirs = getattr(pml_miners, name)(**kwargs)
    assert ours.collect_stats and ours.distance.collect_stats
    ours(x, y)
    theirs(x, y)
    for s in stats:
        _close(getattr(ours, s), getattr(theirs, s), tol=1e-9)
    for s in ("initial_avg_query_norm", "final_avg_ref_norm"):
        _close(getattr(ours.distance, s), getattr(theirs.distance, s), tol=1e-9)


def test_switch_is_read_at_construction_and_explicit_value_wins(monkeypatch):
    assert not miners.BatchHardMiner().collect_stats
    monkeypatch.setattr(fd_cf, "COLLECT_STATS", True)
    assert miners.BatchHardMiner().collect_stats and reducers.MeanReducer().collect_stats
    assert not miners.BatchHardMiner(collect_stats=False).collect_stats
    assert distances.LpDistance().collect_stats and losses.ContrastiveLoss().collect_stats


@pytest.mark.parametrize("loss_name", ["ContrastiveLoss", "TripletMarginLoss"])
def test_loss_statistics_match_pml(monkeypatch, loss_name):
    monkeypatch.setattr(pml_cf, "COLLECT_STATS", True)
    x, y = _batch(pattern="imbalanced")
    ours, theirs = getattr(losses, loss_name)(), getattr(pml_losses, loss_name)()
    _close(ours(x, y), theirs(x, y))
    sub = ["pos_loss", "neg_loss"] if loss_name == "ContrastiveLoss" else [None]
    for k in sub:
        r_ours = ours.reducer.reducers[k] if k else ours.reducer
        r_theirs = theirs.reducer.reducers[k] if k else theirs.reducer
        for s in ("losses_size", "num_past_filter", "num_above_low"):
            assert getattr(r_ours, s) == getattr(r_theirs, s)
    for s in ("initial_avg_query_norm", "final_avg_query_norm"):
        _close(getattr(ours.distance, s), getattr(theirs.distance, s), tol=1e-9)


def test_statistics_off_keeps_the_fused_path():
    loss = losses.TripletMarginLoss()
    assert not loss.collect_stats and loss._fusable()
    assert distances.fused_spec(loss.distance) is not None
    assert reducers.reducer_window(loss.reducer) is not None
    assert distances.fused_spec(distances.LpDistance(collect_stats=True)) is None
    assert reducers.reducer_window(reducers.MeanReducer(collect_stats=True)) is None


# ---- CrossBatchMemory ----
def _memory_pair(loss_name, miner_name, memory_size=20, **miner_kwargs):
    ours = losses.CrossBatchMemory(
        getattr(losses, loss_name)(),
        D,
        memory_size=memory_size,
        miner=None if miner_name is None else getattr(miners, miner_name)(**miner_kwargs),
    )
    theirs = pml_losses.CrossBatchMemory(
        getattr(pml_losses, loss_name)(),
        D,
        memory_size=memory_size,
        miner=None if miner_name is None else getattr(pml_miners, miner_name)(**miner_kwargs),
    )
    return ours, theirs


@pytest.mark.parametrize(
    "loss_name,miner_name,kwargs",
    [
        ("TripletMarginLoss", "BatchHardMiner", {}),
        ("ContrastiveLoss", "BatchEasyHardMiner", {"pos_strategy": "easy", "neg_strategy": "easy"}),
        ("ContrastiveLoss", "MultiSimilarityMiner", {}),
        ("TripletMarginLoss", "TripletMarginMiner", {"margin": 0.4}),
        ("ContrastiveLoss", "PairMarginMiner", {}),
        ("ContrastiveLoss", None, {}),
    ],
)
def test_memory_with_inner_miner_matches_pml_over_wrapping_steps(loss_name, miner_name, kwargs):
    ours, theirs = _memory_pair(loss_name, miner_name, **kwargs)
    for step in range(5):
        x, y = _batch(n=8, pattern="pk", seed=10 + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        lo, lt = ours(xa, y), theirs(xb, y)
        _close(lo, lt)
        lo.backward()
        lt.backward()
        _close(xa.grad, xb.grad)
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)
        assert torch.equal(ours.label_memory, theirs.label_memory)
        _close(ours.embedding_memory, theirs.embedding_memory)


def test_memory_create_indices_tuple_and_reset_match_pml():
    ours, theirs = _memory_pair("ContrastiveLoss", "BatchHardMiner")
    x, y = _batch(n=8, pattern="pk", seed=1)
    ours(x, y)
    theirs(x, y)
    x2, y2 = _batch(n=8, pattern="pk", seed=2)
    for m in (ours, theirs):
        m.add_to_memory(x2, y2, len(x2))
    e, lab = ours.embedding_memory[: ours.queue_idx], ours.label_memory[: ours.queue_idx]
    given = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    for remove in (True, False):
        _same_tuple(
            ours.create_indices_tuple(x2, y2, e, lab, given, remove),
            theirs.create_indices_tuple(x2, y2, e, lab, given, remove),
        )
    ours.reset_queue()
    assert ours.queue_idx == 0 and not ours.has_been_filled and not ours.embedding_memory.any()


def test_memory_enqueue_mask_and_given_indices_match_pml():
    ours, theirs = _memory_pair("ContrastiveLoss", None)
    for step in range(4):
        x, y = _batch(n=8, pattern="pk", seed=30 + step)
        mask = torch.arange(8) % 2 == step % 2
        _close(ours(x, y, enqueue_mask=mask), theirs(x, y, enqueue_mask=mask))
        given = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 2]), torch.tensor([5, 6]))
        _close(ours(x, y, given), theirs(x, y, given))


def test_memory_user_hook_is_called():
    calls = []

    class Logged(losses.CrossBatchMemory):
        def create_indices_tuple(self, *args):
            out = super().create_indices_tuple(*args)
            calls.append(len(out[0]))
            return out

    mem = Logged(losses.ContrastiveLoss(), D, memory_size=16)
    x, y = _batch(n=8, pattern="pk")
    mem(x, y)
    assert calls and calls[0] > 0

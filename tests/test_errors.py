"""Bad input: clear errors that name the argument; inputs PML accepts are accepted the same way."""

import pytest
import torch

from fastdml import functional as FN
from fastdml import losses as L
from fastdml import miners as M
from fastdml import reducers as R
from tests.api_cases import batch, pml_losses

LOSSES = [
    L.ContrastiveLoss,
    L.TripletMarginLoss,
    L.BatchHardTripletLoss,
    L.BatchAllTripletLoss,
    L.SemiHardTripletLoss,
]
MINERS = [M.TripletMarginMiner, M.PairMarginMiner, M.BatchHardMiner, M.BatchEasyHardMiner, M.MultiSimilarityMiner]
CALLABLES = [c() for c in LOSSES] + [c() for c in MINERS]
IDS = [type(c).__name__ for c in CALLABLES]


@pytest.mark.parametrize("fn", CALLABLES, ids=IDS)
def test_embeddings_must_be_2d_floating(fn):
    y = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="embeddings.*2-D"):
        fn(torch.randn(3), y)
    with pytest.raises(ValueError, match="embeddings.*2-D"):
        fn(torch.randn(3, 2, 2), y)
    with pytest.raises(TypeError, match="embeddings.*floating"):
        fn(torch.ones(3, 2, dtype=torch.long), y)
    with pytest.raises(TypeError, match="embeddings.*Tensor"):
        fn([[0.0, 1.0]] * 3, y)


@pytest.mark.parametrize("fn", CALLABLES, ids=IDS)
def test_labels_length_shape_dtype(fn):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels has length 3 but there are 4 embeddings"):
        fn(x, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        fn(x, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must have a real dtype"):
        fn(x, torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="labels contains NaN"):
        fn(x, torch.tensor([0.0, float("nan"), 1.0, 0.0]))
    with pytest.raises(TypeError, match="labels must be a 1-D torch.Tensor"):
        fn(x, [0, 1, 0, 1])


@pytest.mark.parametrize("fn", CALLABLES, ids=IDS)
def test_ref_emb_checks(fn):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match="ref_emb has dtype torch.float64"):
        fn(x, y, ref_emb=torch.randn(5, 3, dtype=torch.float64), ref_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb must have the embeddings' width 3"):
        fn(x, y, ref_emb=torch.randn(5, 2), ref_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels has length 4 but there are 5 embeddings"):
        fn(x, y, ref_emb=torch.randn(5, 3), ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_labels is required"):
        fn(x, y, ref_emb=torch.randn(5, 3))


def test_ref_emb_on_another_device_is_named():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    meta = torch.empty(5, 3, device="meta")
    with pytest.raises(ValueError, match="ref_emb is on meta but embeddings are on cpu"):
        L.ContrastiveLoss()(x, y, ref_emb=meta, ref_labels=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("cls", [L.ContrastiveLoss, L.TripletMarginLoss])
def test_indices_tuple_checks(cls):
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    loss = cls()
    with pytest.raises(ValueError, match="indices_tuple must have 3"):
        loss(x, y, (torch.tensor([0]), torch.tensor([1])))
    with pytest.raises(TypeError, match="indices_tuple must be a tuple"):
        loss(x, y, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"indices_tuple: tensors \(0, 1, 2\) must have the same length"):
        loss(x, y, (torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([1])))
    with pytest.raises(ValueError, match=r"indices_tuple\[1\] has indices in \[0, 7\]"):
        loss(x, y, (torch.tensor([0, 1]), torch.tensor([0, 7]), torch.tensor([1, 1])))
    with pytest.raises(TypeError, match=r"indices_tuple\[2\] must hold integer indices"):
        loss(x, y, (torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0])))
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        loss(x)


def test_unknown_option_values():
    with pytest.raises(ValueError, match="type_of_triplets must be one of"):
        M.TripletMarginMiner(type_of_triplets="hardest")
    with pytest.raises(ValueError, match="pos_strategy must be one of"):
        M.BatchEasyHardMiner(pos_strategy="medium")
    with pytest.raises(ValueError, match="neg_strategy must be one of"):
        M.BatchEasyHardMiner(neg_strategy="medium")
    with pytest.raises(ValueError, match="cannot both be"):
        M.BatchEasyHardMiner(pos_strategy="semihard", neg_strategy="semihard")
    with pytest.raises(ValueError, match="cannot be used in combination"):
        M.BatchEasyHardMiner(pos_strategy="all", neg_strategy="semihard")
    with pytest.raises(ValueError, match="allowed_pos_range"):
        M.BatchEasyHardMiner(allowed_pos_range=(0.1,))
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        L.TripletMarginLoss(triplets_per_anchor=0)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        L.TripletMarginLoss(triplets_per_anchor="some")
    with pytest.raises(ValueError, match="average must be one of"):
        L.BatchAllTripletLoss(average="median")
    with pytest.raises(TypeError, match="margin must be a real number"):
        L.TripletMarginLoss(margin="0.1")
    with pytest.raises(ValueError, match="margin must be a finite number"):
        L.TripletMarginLoss(margin=float("nan"))
    with pytest.raises(ValueError, match="ThresholdReducer"):
        R.ThresholdReducer()
    with pytest.raises(ValueError, match="distance must be one of"):
        FN.contrastive_loss(torch.randn(3, 2), torch.tensor([0, 1, 0]), distance="manhattan")
    with pytest.raises(ValueError, match="reduction must be one of"):
        FN.contrastive_loss(torch.randn(3, 2), torch.tensor([0, 1, 0]), reduction="max")
    with pytest.raises(ValueError, match="is_inverted"):
        __import__("fastdml").distances.LpDistance(is_inverted=True)


def test_miners_require_labels():
    with pytest.raises(ValueError, match="labels are required"):
        M.TripletMarginMiner()(torch.randn(4, 2), None)


def test_paired_contrastive_checks():
    loss = L.PairedContrastiveLoss()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    lab = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="x and y must have the same number of rows"):
        loss(x, torch.randn(5, 3), lab, lab)
    with pytest.raises(ValueError, match="y_labels has length 3"):
        loss(x, y, lab, lab[:3])
    with pytest.raises(ValueError, match="not a similarity"):
        L.PairedContrastiveLoss(distance=__import__("fastdml").distances.CosineSimilarity())


# ---- what PML accepts, fastdml accepts the same way ----
@pytest.mark.parametrize("labels", ["float", "bool", "int32", "uint8"])
def test_label_dtypes_accepted_like_pml(labels):
    x, y = batch(n=10, d=3, classes=2, seed=0)
    lab = {"float": y.double() * 1.5, "bool": y.bool(), "int32": y.int(), "uint8": y.to(torch.uint8)}[labels]
    for ours, theirs in [
        (L.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
        (L.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3)),
    ]:
        torch.testing.assert_close(ours(x, lab), theirs(x, lab))


def test_float_labels_with_ref_labels_of_another_dtype():
    x, y = batch(n=8, d=3, classes=3, seed=1)
    r, z = batch(n=6, d=3, classes=3, seed=2)
    got = L.TripletMarginLoss(margin=0.3)(x, y.double(), ref_emb=r, ref_labels=z)
    want = pml_losses.TripletMarginLoss(margin=0.3)(x, y.double(), ref_emb=r, ref_labels=z)
    torch.testing.assert_close(got, want)

"""Names fastdml does not implement come from PML (its own classes); without PML, a clear AttributeError."""

import builtins
import importlib
import sys

import pytest
import torch

import fastdml
from tests.api_cases import batch, pml_distances, pml_losses, pml_miners, pml_reducers

FALLBACKS = [
    ("losses", "NTXentLoss", pml_losses),
    ("losses", "SupConLoss", pml_losses),
    ("losses", "ArcFaceLoss", pml_losses),
    ("losses", "MultipleLosses", pml_losses),
    ("miners", "AngularMiner", pml_miners),
    ("distances", "SNRDistance", pml_distances),
    ("reducers", "ClassWeightedReducer", pml_reducers),
]


@pytest.mark.parametrize("module,name,pml_module", FALLBACKS)
def test_unimplemented_names_are_pml_classes(module, name, pml_module):
    mod = importlib.import_module(f"fastdml.{module}")
    assert getattr(mod, name) is getattr(pml_module, name)


def test_fastdml_names_are_fastdml_classes():
    assert fastdml.losses.ContrastiveLoss is not pml_losses.ContrastiveLoss
    assert fastdml.losses.ContrastiveLoss.__module__.startswith("fastdml.losses.")
    assert fastdml.miners.TripletMarginMiner.__module__.startswith("fastdml.miners.")
    assert fastdml.distances.LpDistance.__module__ == "fastdml.distances"
    assert fastdml.reducers.AvgNonZeroReducer.__module__ == "fastdml.reducers"
    # fastdml's own CrossBatchMemory (not PML's, which the fallback would give)
    assert fastdml.losses.CrossBatchMemory.__module__ == "fastdml.losses.cross_batch_memory"


def test_unknown_name_raises_attribute_error_listing_fastdml_names():
    with pytest.raises(AttributeError, match="NoSuchLoss.*fastdml provides: .*ContrastiveLoss"):
        fastdml.losses.NoSuchLoss  # noqa: B018


def test_without_pml_the_error_says_how_to_get_it(monkeypatch):
    real_import = builtins.__import__

    def no_pml(name, *args, **kwargs):
        if name.startswith("pytorch_metric_learning"):
            raise ImportError("no PML here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pml)
    for key in [k for k in sys.modules if k.startswith("pytorch_metric_learning")]:
        monkeypatch.delitem(sys.modules, key)
    with pytest.raises(AttributeError, match="install pytorch-metric-learning.*fastdml provides"):
        fastdml.losses.NTXentLoss  # noqa: B018


def test_pml_fallback_loss_works_with_fastdml_distance_and_miner():
    x, y = batch(n=12, d=4, classes=3, seed=0)
    loss = fastdml.losses.NTXentLoss(distance=fastdml.distances.CosineSimilarity())
    want = pml_losses.NTXentLoss(distance=pml_distances.CosineSimilarity())
    torch.testing.assert_close(loss(x, y), want(x, y))
    ms = fastdml.losses.MultipleLosses([fastdml.losses.ContrastiveLoss(), fastdml.losses.TripletMarginLoss()])
    ps = pml_losses.MultipleLosses([pml_losses.ContrastiveLoss(), pml_losses.TripletMarginLoss()])
    torch.testing.assert_close(ms(x, y), ps(x, y))

"""The demo's loss recipes: fastdml's classes give the numbers of pytorch-metric-learning's identical recipe."""

import pytest
import torch

from fastdml import distances, losses
from fastdml.demo.recipes import DEFAULTS, LOSSES, MININGS, build_recipe

PML_RECIPES = [(loss, mining) for loss in ("contrastive", "triplet") for mining in MININGS[loss]]


def _pk_batch(p=10, k=7, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)
    return torch.randn(p * k, d, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("loss, mining", PML_RECIPES)
@pytest.mark.parametrize("margin", [None, 0.5])
def test_recipe_matches_the_same_recipe_built_from_pml(loss, mining, margin, monkeypatch, tol):
    x, y = _pk_batch(seed=len(mining))
    upstream = torch.tensor(1.7, dtype=torch.float64)
    results = []
    for library in ("fastdml", "pml"):
        monkeypatch.setenv("FASTDML_DEMO_LIB", library)
        recipe = build_recipe(loss, mining, margin)
        emb = x.clone().requires_grad_()
        value = recipe(emb, y)
        (grad,) = torch.autograd.grad(value * upstream, emb)
        results.append((value.detach(), grad))
    (v_fast, g_fast), (v_pml, g_pml) = results
    assert v_pml > 0  # the batch gives the loss something to do: the comparison is not 0 == 0
    torch.testing.assert_close(v_fast, v_pml, **tol[torch.float64])
    torch.testing.assert_close(g_fast, g_pml, **tol[torch.float64])


def test_paired_contrastive_recipe_is_the_library_loss_on_the_two_halves(tol):
    x, y = _pk_batch(p=5, k=8, seed=3)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    recipe = build_recipe("paired-contrastive", margin=1.5, positive_weight=0.3)
    half = len(x) // 2
    criterion = losses.PairedContrastiveLoss(
        distance=distances.LpDistance(normalize_embeddings=False), margin=1.5, positive_weight=0.3
    )
    want = criterion(x[:half], x[half:], y[:half], y[half:]) / half
    torch.testing.assert_close(recipe(x, y), want, **tol[torch.float64])


@pytest.mark.parametrize("loss", LOSSES)
def test_defaults_are_filled_in(loss):
    recipe = build_recipe(loss)
    assert recipe.mining == DEFAULTS[loss]["mining"] == MININGS[loss][0]
    assert recipe.margin == DEFAULTS[loss]["margin"]


def test_bad_recipe_arguments_are_named():
    with pytest.raises(ValueError, match="loss must be one of"):
        build_recipe("npair")
    with pytest.raises(ValueError, match="mining for loss 'triplet'"):
        build_recipe("triplet", "pair-margin")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        build_recipe("contrastive", margin=-1)

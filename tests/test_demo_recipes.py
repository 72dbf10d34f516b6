"""The demo's loss recipes: fastdml's classes give the numbers of pytorch-metric-learning's identical recipe."""

import pytest
import torch

from fastdml import distances, losses
from fastdml.demo.recipes import DEFAULTS, LOSSES, MININGS, REDUCERS, build_recipe

PML_RECIPES = [(loss, mining) for loss in ("contrastive", "triplet") for mining in MININGS[loss]]


def _pk_batch(p=10, k=7, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)
    return torch.randn(p * k, d, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("loss, mining", PML_RECIPES)
@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("reducer", REDUCERS)
def test_recipe_matches_the_same_recipe_built_from_pml(loss, mining, margin, reducer, monkeypatch, tol):
    x, y = _pk_batch(seed=len(mining))
    upstream = torch.tensor(1.7, dtype=torch.float64)
    results = []
    for library in ("fastdml", "pml"):
        monkeypatch.setenv("FASTDML_DEMO_LIB", library)
        recipe = build_recipe(loss, mining, margin, reducer=reducer)
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
    recipe = build_recipe("paired-contrastive", "none", margin=1.5, positive_weight=0.3)
    half = len(x) // 2
    criterion = losses.PairedContrastiveLoss(
        distance=distances.LpDistance(normalize_embeddings=False), margin=1.5, positive_weight=0.3
    )
    want = criterion(x[:half], x[half:], y[:half], y[half:]) / half
    torch.testing.assert_close(recipe(x, y), want, **tol[torch.float64])


@pytest.mark.parametrize("pos_margin", [0.0, 1.0])
def test_paired_contrastive_pair_margin_is_the_written_loss_on_the_mined_pairs(pos_margin, tol):
    x, y = _pk_batch(p=4, k=6, d=2, seed=5)
    x = (x * 1.2).requires_grad_()
    margin, w = 1.5, 0.3
    recipe = build_recipe("paired-contrastive", "pair-margin", margin, pos_margin, w)
    value = recipe(x, y)
    (grad,) = torch.autograd.grad(value, x)
    # by hand: every ordered pair i != j; positives farther than pos_margin, negatives nearer than margin
    xd = x.detach().clone().requires_grad_()
    d = torch.cdist(xd, xd)
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    pos = same & off & (d > pos_margin)
    neg = ~same & (d < margin)
    want = (w * d[pos].square()).sum() + ((1 - w) * (margin - d[neg]).square()).sum()
    want = want / (pos.sum() + neg.sum())
    (want_grad,) = torch.autograd.grad(want, xd)
    assert pos.any() and neg.any()
    torch.testing.assert_close(value.detach(), want.detach(), **tol[torch.float64])
    torch.testing.assert_close(grad, want_grad, **tol[torch.float64])


def test_paired_contrastive_with_nothing_mined_is_zero_with_a_gradient():
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64, requires_grad=True)
    recipe = build_recipe("paired-contrastive", "pair-margin", margin=1.0, pos_margin=0.0)
    value = recipe(x, torch.tensor([0, 1]))  # one negative pair, already beyond the margin
    assert value.item() == 0.0 and value.requires_grad


@pytest.mark.parametrize("loss", LOSSES)
def test_defaults_are_filled_in(loss):
    recipe = build_recipe(loss)
    assert recipe.mining == DEFAULTS[loss]["mining"] == MININGS[loss][0]
    assert recipe.margin == DEFAULTS[loss]["margin"]


@pytest.mark.parametrize("reducer", REDUCERS)
def test_all_pairs_and_all_triplets_by_hand(reducer, tol):
    x, y = _pk_batch(p=4, k=5, d=2, seed=7)
    x = (x * 1.5).requires_grad_()
    d = torch.cdist(x, x)
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    pos, neg = same & off, ~same

    def average(terms):  # mean over all terms, or over the non-zero ones
        return terms.mean() if reducer == "mean" else terms.sum() / (terms > 0).sum()

    pos_terms, neg_terms = (d[pos] - 0.5).relu(), (2.0 - d[neg]).relu()
    want = {"contrastive": average(pos_terms) + average(neg_terms)}
    triplets = pos[:, :, None] & neg[:, None, :]  # (anchor, positive, negative)
    want["triplet"] = average((d[:, :, None] - d[:, None, :] + 1.0).relu()[triplets])
    for loss, margin, pos_margin in (("contrastive", 2.0, 0.5), ("triplet", 1.0, None)):
        recipe = build_recipe(
            loss, "none" if loss == "contrastive" else "batch-all", margin, pos_margin, reducer=reducer
        )
        value = recipe(x, y)
        assert recipe.reducer == reducer and want[loss] > 0
        torch.testing.assert_close(value, want[loss], **tol[torch.float64])
        got, expected = (torch.autograd.grad(v, x, retain_graph=True)[0] for v in (value, want[loss]))
        torch.testing.assert_close(got, expected, **tol[torch.float64])


def test_bad_recipe_arguments_are_named():
    with pytest.raises(ValueError, match="reducer must be one of"):
        build_recipe("contrastive", reducer="sum")
    with pytest.raises(ValueError, match="reducer applies to the contrastive and triplet losses only"):
        build_recipe("paired-contrastive", reducer="mean")
    with pytest.raises(ValueError, match="loss must be one of"):
        build_recipe("npair")
    with pytest.raises(ValueError, match="mining for loss 'triplet'"):
        build_recipe("triplet", "pair-margin")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        build_recipe("contrastive", margin=-1)

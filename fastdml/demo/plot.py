"""Figures of the demo (matplotlib, Agg backend: no display needed).

- :func:`plot_embedding`: the test embeddings, one colour per digit, with a legend (like the figures of
  Hadsell, Chopra and LeCun 2006): a strip plot by digit in 1-D, a scatter in 2-D, three projections in 3-D.
- :func:`plot_progress`: small multiples of the embedding after several epochs beside the loss curve.
- :func:`plot_loss`: the loss per step and its moving average.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["plot_embedding", "plot_loss", "plot_progress"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _principal(embeddings: np.ndarray, k: int) -> np.ndarray:
    centred = embeddings - embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def _check(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or embeddings.shape[1] < 1:
        raise ValueError(
            f"embeddings must be (n, d) with d >= 1 and n = len(labels); got {embeddings.shape} and "
            f"{len(labels)} labels"
        )
    return embeddings, labels


def _scatter(ax, points: np.ndarray, labels: np.ndarray, cmap, size: float = 2.0) -> None:
    """Points (n, 2) coloured by digit, one call per class (for the legend)."""
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=size,
            color=cmap(int(c) % 10),
            alpha=0.6,
            linewidths=0,
            label=str(c),
            rasterized=True,
        )


def _strip(ax, values: np.ndarray, labels: np.ndarray, cmap, rng, size: float = 2.0) -> None:
    """A 1-D embedding: one row per digit, the value on x, a small vertical jitter to show density."""
    jitter = rng.uniform(-0.3, 0.3, size=len(values))
    _scatter(ax, np.stack([values, labels + jitter], axis=1), labels, cmap, size)
    ax.set_yticks(np.unique(labels))
    ax.set_ylabel("digit")


def _draw(ax, embeddings: np.ndarray, labels: np.ndarray, cmap, rng, size: float = 2.0) -> str:
    """One panel: strip plot (d = 1), scatter (d = 2), first two principal components (d > 2); its x label."""
    d = embeddings.shape[1]
    if d == 1:
        _strip(ax, embeddings[:, 0], labels, cmap, rng, size)
        return "embedding"
    points = embeddings if d == 2 else _principal(embeddings, 2)
    _scatter(ax, points, labels, cmap, size)
    ax.set_aspect("equal", adjustable="datalim")
    return "embedding 1" if d == 2 else "principal component 1"


def _shuffled(embeddings, labels, max_points, seed):
    rng = np.random.default_rng(seed)
    if max_points is not None and len(labels) > max_points:
        keep = rng.choice(len(labels), size=max_points, replace=False)
        embeddings, labels = embeddings[keep], labels[keep]
    order = rng.permutation(len(labels))  # shuffled drawing order: no digit is painted over all the others
    return embeddings[order], labels[order], rng


def plot_embedding(
    embeddings,
    labels,
    path: str | os.PathLike,
    title: str = "",
    subtitle: str = "",
    max_points: int | None = None,
    seed: int = 0,
) -> str:
    """Draw ``embeddings`` (n, d) coloured by ``labels`` (0-9) into the PNG ``path``; returns the path.

    d = 1: a strip plot (value on x, one row per digit); d = 2: a scatter; d = 3: the three projections
    on pairs of axes side by side; d > 3: the first two principal components.
    """
    embeddings, labels = _check(embeddings, labels)
    embeddings, labels, rng = _shuffled(embeddings, labels, max_points, seed)
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    d = embeddings.shape[1]
    if d == 3:
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.8), dpi=100)
        for ax, (i, j) in zip(axes, ((0, 1), (0, 2), (1, 2))):
            _scatter(ax, embeddings[:, [i, j]], labels, cmap)
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xlabel(f"embedding {i + 1}")
            ax.set_ylabel(f"embedding {j + 1}")
        legend_ax = axes[-1]
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.0 if d == 1 else 6.0), dpi=100)
        ax.set_xlabel(_draw(ax, embeddings, labels, cmap, rng))
        if d >= 2:
            ax.set_ylabel("embedding 2" if d == 2 else "principal component 2")
        legend_ax = ax
    if d != 1:
        legend_ax.legend(title="digit", markerscale=5, loc="best", fontsize=8, title_fontsize=8, framealpha=0.8)
    if title or subtitle:
        fig.suptitle(title + ("\n" + subtitle if subtitle else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_progress(
    snapshots,
    labels,
    step_losses,
    path: str | os.PathLike,
    steps_per_epoch: int | None = None,
    title: str = "",
    max_points: int = 2000,
    seed: int = 0,
) -> str:
    """Small multiples of the embedding as it is learned, beside the loss curve, into the PNG ``path``.

    ``snapshots``: ``[(epoch, embeddings (n, d)), ...]`` of the same ``labels`` (n,); each gets a panel
    (:func:`plot_embedding`'s forms, 3-D by its first two principal components), with shared limits
    from the last snapshot so the panels compare. The loss per step takes the last column.
    """
    if not snapshots:
        raise ValueError("snapshots must hold at least one (epoch, embeddings) pair")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(labels))[:max_points]
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    n = len(snapshots)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = plt.figure(figsize=(3.2 * cols + 5.0, 3.3 * rows), dpi=100)
    grid = fig.add_gridspec(rows, cols + 2)
    last = None
    for i, (epoch, emb) in enumerate(snapshots):
        emb, _ = _check(emb, labels)
        ax = fig.add_subplot(grid[i // cols, i % cols])
        _draw(ax, emb[keep], labels[keep], cmap, np.random.default_rng(seed), size=1.5)
        ax.set_title(f"epoch {epoch}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("")
        last = ax
    handles, names = last.get_legend_handles_labels()
    loss_ax = fig.add_subplot(grid[:, cols:])
    _loss_curve(loss_ax, np.asarray(step_losses, dtype=np.float64), steps_per_epoch)
    loss_ax.legend(
        handles + loss_ax.get_legend_handles_labels()[0],
        names + loss_ax.get_legend_handles_labels()[1],
        fontsize=7,
        markerscale=5,
        ncol=2,
        loc="upper right",
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _loss_curve(ax, values: np.ndarray, steps_per_epoch: int | None) -> None:
    steps = np.arange(1, len(values) + 1)
    if steps_per_epoch:
        x, xlabel = steps / steps_per_epoch, "epoch"
    else:
        x, xlabel = steps, "step"
    ax.plot(x, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
    window = max(1, min(50, len(values) // 10))
    if len(values) >= window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1 :], smooth, color="tab:blue", linewidth=1.5, label=f"mean of {window} steps")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if len(values) and np.all(values > 0) and values.max() / values.min() > 30:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def plot_loss(step_losses, path: str | os.PathLike, steps_per_epoch: int | None = None, title: str = "") -> str:
    """The training loss per step (faint) and its moving average into the PNG ``path``; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    _loss_curve(ax, np.asarray(step_losses, dtype=np.float64), steps_per_epoch)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)

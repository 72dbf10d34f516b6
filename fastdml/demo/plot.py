"""Figures of the demo (matplotlib, Agg backend: no display needed).

- :func:`plot_embedding`: the 2-D test embeddings, one colour per digit, with a legend (like the figures of
  Hadsell, Chopra and LeCun 2006); embeddings of more than two dimensions are drawn by their first two
  principal components.
- :func:`plot_loss`: the loss per step and its moving average.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["plot_embedding", "plot_loss"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _two_d(embeddings: np.ndarray) -> tuple[np.ndarray, str]:
    if embeddings.shape[1] == 2:
        return embeddings, ""
    if embeddings.shape[1] == 1:
        return np.concatenate([embeddings, np.zeros_like(embeddings)], axis=1), " (1-D)"
    centred = embeddings - embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, " (first two principal components)"


def plot_embedding(
    embeddings,
    labels,
    path: str | os.PathLike,
    title: str = "",
    subtitle: str = "",
    max_points: int | None = None,
    seed: int = 0,
) -> str:
    """Scatter ``embeddings`` (n, d) coloured by ``labels`` (0-9) into the PNG ``path``; returns the path."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(
            f"embeddings must be (n, d) with n = len(labels); got {embeddings.shape} and {len(labels)} labels"
        )
    if max_points is not None and len(labels) > max_points:
        keep = np.random.default_rng(seed).choice(len(labels), size=max_points, replace=False)
        embeddings, labels = embeddings[keep], labels[keep]
    points, note = _two_d(embeddings)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=100)
    cmap = plt.get_cmap("tab10")
    # shuffled drawing order so no digit is painted over all the others
    order = np.random.default_rng(seed).permutation(len(labels))
    points, labels = points[order], labels[order]
    classes = np.unique(labels)
    for c in classes:
        sel = labels == c
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=2,
            color=cmap(int(c) % 10),
            alpha=0.6,
            linewidths=0,
            label=str(c),
            rasterized=True,
        )
    ax.legend(title="digit", markerscale=5, loc="best", fontsize=8, title_fontsize=8, framealpha=0.8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("embedding 1" + note)
    ax.set_ylabel("embedding 2")
    if title or subtitle:
        ax.set_title(title + ("\n" + subtitle if subtitle else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_loss(step_losses, path: str | os.PathLike, steps_per_epoch: int | None = None, title: str = "") -> str:
    """The training loss per step (faint) and its moving average into the PNG ``path``; returns the path."""
    values = np.asarray(step_losses, dtype=np.float64)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = np.arange(1, len(values) + 1)
    if steps_per_epoch:
        x, xlabel = steps / steps_per_epoch, "epoch"
    else:
        x, xlabel = steps, "step"
    ax.plot(x, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    window = max(1, min(50, len(values) // 10))
    if len(values) >= window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1 :], smooth, color="tab:blue", linewidth=1.5, label=f"mean of {window} steps")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if len(values) and np.all(values > 0) and values.max() / values.min() > 30:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)

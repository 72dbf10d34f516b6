"""The demo's embedding network: a small CNN with batch norm, a hidden layer, then a linear map to ``dim``.

x (n, 1, 28, 28)
-> [conv3x3 -> maxpool2 -> BN -> ReLU] x 3   (channels c, 2c, 4c; 28 -> 14 -> 7 -> 3)
-> flatten (4c * 3 * 3) -> linear -> BN -> ReLU (hidden)
-> linear (dim), no activation: the embedding may use the whole plane (an activation or a normalization
   there would confine a 2-D embedding to a quadrant or a circle).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbeddingNet"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
        # pooling first: batch norm and ReLU then run on a quarter of the values (bench/RESULTS.md has
        # the step times of both orders)
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class EmbeddingNet(nn.Module):
    """Map MNIST images (n, 1, 28, 28), normalized, to embeddings (n, dim).

    ``width``: channels of the first block (then 2x, 4x); ``hidden``: width of the layer before the
    projection to ``dim``.
    """

    def __init__(self, dim: int = 2, width: int = 16, hidden: int = 512) -> None:
        super().__init__()
        if dim < 1 or width < 1 or hidden < 1:
            raise ValueError(f"dim, width and hidden must be >= 1, got dim={dim}, width={width}, hidden={hidden}")
        self.dim = dim
        self.features = nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * 3 * 3, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

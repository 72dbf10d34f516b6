"""The shortest complete training loop with fastdml: a 2-D embedding of MNIST with a triplet loss.

    python examples/train_mnist.py                       # all 60,000 training images, 5 epochs
    python examples/train_mnist.py --train 600 --test 300 --epochs 1   # a quick look

Data, model, loss and miner, optimiser, evaluation: copy it and change what you need. fastdml's losses and
miners take the same arguments as pytorch-metric-learning's.
"""

import argparse

import numpy as np
import torch
from torch import nn

from fastdml import distances, losses, miners
from fastdml.demo.data import load_mnist  # the four IDX files, checksums verified (data/mnist or a download)
from fastdml.metrics import retrieval_metrics


def embedding_net(dim: int = 2) -> nn.Module:
    """Two conv blocks, a hidden layer, a linear map to ``dim`` (no activation: the embedding uses the plane)."""

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        block(1, 16), block(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, dim)
    )


def images_and_labels(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_mnist(split)
    x = torch.from_numpy(data.images[:n]).float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    return x, torch.from_numpy(data.labels[:n])


def pk_batches(labels: torch.Tensor, p: int, k: int, rng: np.random.Generator):
    """One epoch of batches with ``k`` images of each of ``p`` digits: every anchor has positives."""
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(10)]
    for _ in range(len(labels) // (p * k)):
        classes = rng.choice(10, size=p, replace=False)
        yield torch.from_numpy(np.concatenate([rng.choice(by_class[c], size=k) for c in classes]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60000, help="training images (the first N)")
    parser.add_argument("--test", type=int, default=10000, help="test images (the first N)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batches")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    x_train, y_train = images_and_labels("train", args.train)
    x_test, y_test = images_and_labels("test", args.test)
    model = embedding_net(dim=2)

    # Euclidean distance without normalization: normalized 2-D embeddings would live on a circle
    distance = distances.LpDistance(normalize_embeddings=False)
    loss_fn = losses.TripletMarginLoss(margin=1.0, distance=distance)
    miner = miners.TripletMarginMiner(margin=1.0, type_of_triplets="semihard", distance=distance)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for batch in pk_batches(y_train, p=10, k=10, rng=rng):
            embeddings = model(x_train[batch])
            triplets = miner(embeddings, y_train[batch])  # (anchor, positive, negative) indices
            loss = loss_fn(embeddings, y_train[batch], triplets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} in epoch {epoch}: lower the lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch}: mean loss {total / max(steps, 1):.4f} over {steps} batches")

    # evaluation: each test image queries the other test images (leave-one-out nearest neighbours)
    model.eval()
    with torch.no_grad():
        test_embeddings = torch.cat([model(x_test[i : i + 1000]) for i in range(0, len(x_test), 1000)])
    metrics = retrieval_metrics(test_embeddings, y_test)
    print("  ".join(f"{name} {value:.2%}" for name, value in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()

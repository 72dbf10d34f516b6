"""Class-balanced (PK) batches: each batch holds ``k`` samples of each of ``p`` classes.

Miners that look for the hardest positive of every anchor need positives in the batch; PK batches guarantee
``k - 1`` of them per anchor. Sampling is driven by a numpy ``Generator``, so a seed fixes every batch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PKSampler", "RandomSampler"]


class PKSampler:
    """Batches of ``p`` classes x ``k`` samples; one epoch = ``len(labels) // (p * k)`` batches.

    Every class keeps its own shuffled queue of indices; a batch takes the next ``k`` of each chosen class
    (a queue is reshuffled when exhausted), so every sample is seen about once per epoch.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0) -> None:
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        if not 1 <= p <= len(self.classes):
            raise ValueError(f"p (classes per batch) must be in [1, {len(self.classes)}], got {p}")
        if k < 1:
            raise ValueError(f"k (samples per class) must be >= 1, got {k}")
        self.p, self.k = p, k
        self.rng = np.random.default_rng(seed)
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.queues = [self.rng.permutation(m) for m in self.members]
        self.heads = [0] * len(self.classes)
        self.batches_per_epoch = max(1, len(labels) // (p * k))

    def _take(self, c: int) -> np.ndarray:
        out = []
        need = self.k
        while need:
            queue, head = self.queues[c], self.heads[c]
            got = queue[head : head + need]
            out.append(got)
            need -= len(got)
            self.heads[c] = head + len(got)
            if self.heads[c] >= len(queue):
                self.queues[c] = self.rng.permutation(self.members[c])
                self.heads[c] = 0
        return np.concatenate(out)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        for _ in range(self.batches_per_epoch):
            chosen = self.rng.choice(len(self.classes), size=self.p, replace=False)
            yield np.concatenate([self._take(int(c)) for c in chosen])


class RandomSampler:
    """Plain shuffled batches of ``batch_size`` (the last partial batch dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)

    def __iter__(self):
        order = self.rng.permutation(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

"""Training and evaluation of the demo's embedding network.

One step: a batch (class-balanced PK batch for the batch losses, a shuffled batch for the siamese pairs) ->
embeddings -> recipe loss -> AdamW step; the learning rate follows a one-cycle schedule. Images are held as
one normalized float tensor (channels_last: several times faster convolutions on the CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..metrics import knn_accuracy, retrieval_metrics
from .model import EmbeddingNet
from .recipes import Recipe
from .sampler import PKSampler, RandomSampler

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "to_tensor",
    "random_shift",
    "affine_warp",
    "random_affine",
    "augment",
    "train",
    "embed",
    "evaluate",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI fills them in)."""

    epochs: int = 20
    p: int = 10  # classes per batch
    k: int = 25  # samples per class
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4
    width: int = 16
    hidden: int = 512
    dim: int = 2
    seed: int = 0
    device: str = "cpu"
    sampler: str = "pk"  # "pk" or "random"
    progress: bool = True
    max_steps: int | None = None  # stop early (tests, quick trials)
    shift: int = 0  # augmentation: random translation of each image by up to +-shift pixels (0: off)
    rotate: float = 0.0  # augmentation: random rotation by up to +-rotate degrees (0: off)
    scale: float = 0.0  # augmentation: random zoom by a factor in [1 - scale, 1 + scale] (0: off)


class TrainingDiverged(FloatingPointError):
    """The loss or the embeddings of a training step became NaN or infinite (training stops there)."""

    def __init__(self, what: str, value: float, epoch: int, step: int) -> None:
        super().__init__(f"training diverged: the {what} became {value} at epoch {epoch}, step {step}")
        self.what, self.value, self.epoch, self.step = what, value, epoch, step


@dataclass
class TrainResult:
    model: EmbeddingNet
    losses: list[float] = field(default_factory=list)  # one value per step
    epoch_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # wall clock of the training loop
    cpu_seconds: float = 0.0  # CPU time of this process over the loop (all threads)
    steps: int = 0


def to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (n, 28, 28) -> normalized float32 (n, 1, 28, 28) in channels_last layout on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last)


def random_shift(
    images: torch.Tensor, shift: int, generator: torch.Generator, fill: float = -MNIST_MEAN / MNIST_STD
) -> torch.Tensor:
    """Translate each image (n, 1, h, w) by its own random offset in [-shift, shift]^2.

    Uncovered pixels get ``fill`` (default: a black pixel after normalization).
    """
    if shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift), value=fill)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).to(images.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (n, h)
    cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    return out.contiguous(memory_format=torch.channels_last)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``affine_grid(theta, (n, 1, h, w), align_corners=False)`` by broadcasting: grid[k, i, j] =
    theta[k] @ (x_j, y_i, 1) at the pixel centres x_j = (2j + 1) / w - 1, y_i = (2i + 1) / h - 1.

    Same values within rounding; torch's version builds them with a batched matrix product.
    """
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[..., None, None]  # (n, 2, 3, 1, 1)
    return (t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]).permute(0, 2, 3, 1)  # (n, h, w, 2)


def affine_warp(
    images: torch.Tensor,
    angle: torch.Tensor,
    zoom: torch.Tensor,
    offset: torch.Tensor,
    fill: float = -MNIST_MEAN / MNIST_STD,
) -> torch.Tensor:
    """Rotate each image (n, 1, h, w) by ``angle[i]`` degrees, zoom it by ``zoom[i]`` and move it by
    ``offset[i]`` = (right, down) pixels, about the image centre, with bilinear interpolation.

    The output pixel at x (from the centre, y pointing down) reads the input at R(-angle) (x - offset) / zoom,
    so positive angles turn the digit clockwise on screen. Pixels read from outside the image get ``fill``.
    """
    n, _, h, w = images.shape
    a = torch.deg2rad(angle.to(images.device, images.dtype))
    zoom = zoom.to(images.device, images.dtype)
    offset = offset.to(images.device, images.dtype)
    cos, sin = torch.cos(a) / zoom, torch.sin(a) / zoom
    # affine_grid maps output to input coordinates in which the image spans [-1, 1] both ways (a pixel is
    # 2 / w wide and 2 / h high): the rotation's off-diagonal terms carry the aspect ratio
    tx, ty = offset[:, 0] * 2 / w, offset[:, 1] * 2 / h
    row_x = torch.stack([cos, sin * (h / w), -(cos * tx + sin * (h / w) * ty)], 1)
    row_y = torch.stack([-sin * (w / h), cos, sin * (w / h) * tx - cos * ty], 1)
    grid = _affine_grid(torch.stack([row_x, row_y], 1), h, w)
    out = torch.nn.functional.grid_sample(images - fill, grid, padding_mode="zeros", align_corners=False) + fill
    return out.contiguous(memory_format=torch.channels_last)


def random_affine(
    images: torch.Tensor, shift: float, rotate: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """:func:`affine_warp` of each image (n, 1, h, w) by its own random angle in [-rotate, rotate] degrees,
    zoom in [1 - scale, 1 + scale] and offset in [-shift, shift]^2 pixels (uniform, independent)."""
    u = torch.rand(len(images), 4, generator=generator) * 2 - 1
    return affine_warp(images, u[:, 0] * rotate, 1 + u[:, 1] * scale, u[:, 2:] * shift)


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The training-time augmentation of ``config``.

    With ``config.rotate`` and ``config.scale`` both 0: :func:`random_shift` by whole pixels (none if
    ``config.shift`` is 0). Otherwise :func:`random_affine`: rotation, zoom and a continuous shift.
    """
    if config.rotate or config.scale:
        return random_affine(images, config.shift, config.rotate, config.scale, generator)
    return random_shift(images, config.shift, generator)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return None, iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, the per-epoch summary line remains
        return None, iterable
    bar = tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return bar, bar


def _warm_up(recipe: Recipe, labels: torch.Tensor, dim: int, device: torch.device) -> None:
    """One loss evaluation (forward and backward) on fixed dummy embeddings, outside the timed loop.

    The first call of a fastdml loss loads its custom-op machinery (``torch._dynamo`` and friends), which
    takes seconds; that is start-up, not training. Uses no random numbers, so the run stays reproducible.
    """
    n = min(len(labels), 64)
    dummy = torch.linspace(-1.0, 1.0, n * dim, device=device).reshape(n, dim).requires_grad_()
    recipe(dummy, labels[:n]).backward()


def train(
    recipe: Recipe,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    log=print,
    on_epoch=None,
) -> TrainResult:
    """Train an :class:`EmbeddingNet` on ``images`` (from :func:`to_tensor`) with ``recipe``'s loss.

    Deterministic for a given ``config.seed`` on a given device and thread count. ``log`` gets one summary
    line per epoch. ``on_epoch(epoch, model)``, if given, is called before training (epoch 0) and after
    each epoch (e.g. to take snapshots of the embedding); its time is not counted in ``train_seconds``.
    It must not change the model or draw random numbers.
    """
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = EmbeddingNet(config.dim, config.width, config.hidden).to(device=device, memory_format=torch.channels_last)
    labels_np = labels.cpu().numpy()
    if config.sampler == "pk":
        sampler = PKSampler(labels_np, config.p, config.k, seed=config.seed)
    elif config.sampler == "random":
        sampler = RandomSampler(len(labels_np), config.p * config.k, seed=config.seed)
    else:
        raise ValueError(f"sampler must be 'pk' or 'random', got {config.sampler!r}")
    steps_per_epoch = len(sampler)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # OneCycleLR divides by its warm-up length (a quarter of total_steps, minus one), zero at 4 steps: runs
    # of 4 steps or fewer take a 5-step schedule and end before it does
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(total, 5), pct_start=0.25
    )
    labels = labels.to(device)
    result = TrainResult(model=model)
    augmenter = torch.Generator().manual_seed(config.seed + 1)
    _warm_up(recipe, labels, config.dim, device)
    outside, cpu_outside = 0.0, 0.0  # time spent in on_epoch, taken out of the training time

    def call_on_epoch(epoch: int) -> None:
        nonlocal outside, cpu_outside
        if on_epoch is not None:
            t, c = time.perf_counter(), time.process_time()
            on_epoch(epoch, model)
            outside += time.perf_counter() - t
            cpu_outside += time.process_time() - c

    if on_epoch is not None:
        on_epoch(0, model)  # before the clock starts
    start, cpu_start = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(1, config.epochs + 1):
        if step >= total:
            break
        model.train()
        epoch_start = time.perf_counter()
        bar, batches = _progress(sampler, steps_per_epoch, f"epoch {epoch}/{config.epochs}", config.progress)
        running, seen = 0.0, 0
        for batch in batches:
            index = torch.from_numpy(batch).to(device)
            embeddings = model(augment(images[index], config, augmenter))
            loss = recipe(embeddings, labels[index])
            # stop before a non-finite step is applied; a loss can stay finite on non-finite embeddings
            # (an infinite distance clears a hinge), so both are checked
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged("loss", value, epoch, step)
            finite = torch.isfinite(embeddings.detach())
            if not bool(finite.all()):
                raise TrainingDiverged("embedding", float(embeddings.detach()[~finite][0]), epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            result.losses.append(value)
            running += value
            seen += 1
            step += 1
            if bar is not None:
                bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
            if step >= total:
                break
        if bar is not None:
            bar.close()
        mean = running / max(seen, 1)
        result.epoch_losses.append(mean)
        log(
            f"epoch {epoch:3d}/{config.epochs}  loss {mean:.4f}  {time.perf_counter() - epoch_start:6.1f} s  "
            f"lr {schedule.get_last_lr()[0]:.2e}"
        )
        call_on_epoch(epoch)
    result.train_seconds = time.perf_counter() - start - outside
    result.cpu_seconds = time.process_time() - cpu_start - cpu_outside
    result.steps = step
    return result


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Embeddings (n, dim) of ``images`` in eval mode (batch norm uses its running statistics)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).float()


def evaluate(train_embeddings, train_labels, test_embeddings, test_labels) -> dict[str, float]:
    """Test queries against the test set (leave-one-out) and 1-NN accuracy from train to test."""
    metrics = retrieval_metrics(test_embeddings, test_labels)
    metrics["knn_accuracy"] = knn_accuracy(test_embeddings, test_labels, train_embeddings, train_labels)
    return metrics

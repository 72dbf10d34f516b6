"""``python -m fastdml.demo`` / ``fastdml-demo``: learn a 2-D embedding of MNIST and draw it.

Trains a small CNN with a metric-learning loss from fastdml, evaluates it by nearest neighbours
(:mod:`fastdml.metrics`) and writes into ``--out``: ``embedding.png`` (the test embeddings by digit: a strip
plot in 1-D, a scatter in 2-D, three projections in 3-D), ``progress.png`` (the embedding after several
epochs beside the loss curve), ``loss.png``, ``metrics.json`` and ``model.pt``. The console ends with one
line of the key figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

N_CLASSES = 10  # MNIST digits
SNAPSHOT_IMAGES = 2000  # evaluation images drawn in progress.png
MAX_SHIFT = 13  # --shift: beyond half the 28-pixel image the digit can leave the frame
MAX_ROTATE = 180.0  # --rotate, degrees
MAX_SCALE = 0.5  # --scale: zoom factors in [0.5, 1.5]

# Idle OpenMP threads spin briefly, then sleep: long spins (libgomp's default) slow training on a shared
# CPU, none (OMP_WAIT_POLICY=PASSIVE, faster there) slow it on an idle one (bench/RESULTS.md). libgomp
# reads GOMP_SPINCOUNT once, when torch is loaded: hence here, before any import of torch.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: ...)`` only for fixed defaults; per-loss defaults are spelled out in the help text."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .recipes import DEFAULTS, LOSSES, MININGS, REDUCERS

    def per_loss(key: str) -> str:
        return ", ".join(f"{loss}: {DEFAULTS[loss][key]}" for loss in LOSSES)

    parser = argparse.ArgumentParser(
        prog="fastdml-demo",
        description="Learn a low-dimensional embedding of MNIST with a fastdml metric-learning loss, evaluate "
        "it by nearest neighbours and plot it. Options left unset take the chosen loss's measured defaults.",
        formatter_class=_HelpFormatter,
    )
    g = parser.add_argument_group("loss")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="contrastive",
        help="contrastive: all pairs of a batch (Hadsell et al. 2006, batch form); paired-contrastive: "
        "the squared-hinge pair loss of Hadsell et al. with positive_weight, on mined pairs (or the siamese pairs "
        "(i, i + B/2) with --mining none); triplet: margin triplet loss on mined triplets",
    )
    g.add_argument(
        "--mining",
        default=None,
        help="pair/triplet selection; "
        + "; ".join(f"{loss}: {'|'.join(MININGS[loss])}" for loss in LOSSES)
        + " (default: the first of each list). none/batch-all: every pair/triplet of the batch",
    )
    g.add_argument(
        "--margin",
        type=float,
        default=None,
        help="contrastive: neg_margin; paired-contrastive: margin; triplet: margin (default per loss: "
        + per_loss("margin")
        + ")",
    )
    g.add_argument(
        "--pos-margin",
        type=float,
        default=None,
        help="contrastive: pos_margin, positive pairs closer than this cost nothing; paired-contrastive with "
        "pair-margin mining: positive pairs closer than this are not mined (default per loss: "
        + per_loss("pos_margin")
        + ")",
    )
    g.add_argument(
        "--positive-weight",
        type=float,
        default=None,
        help="paired-contrastive only: weight of the positive term, 1 - it on the negative term "
        f"(default {DEFAULTS['paired-contrastive']['positive_weight']})",
    )
    g.add_argument(
        "--reducer",
        choices=REDUCERS,
        default=None,
        help="contrastive and triplet only: average the terms over every pair (the positive and the negative "
        "terms apart) or triplet (mean), or over those that are not zero (avg-nonzero) (default per loss: "
        + ", ".join(f"{loss}: {DEFAULTS[loss]['reducer']}" for loss in LOSSES if DEFAULTS[loss]["reducer"])
        + ")",
    )
    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--dim", type=int, default=2, help="embedding dimension")
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="channels of the first conv block, then 2x, 4x (default per loss: " + per_loss("width") + ")",
    )
    g.add_argument("--hidden", type=int, default=512, help="width of the hidden layer before the projection")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default per loss: " + per_loss("epochs") + ")")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of AdamW's one-cycle schedule (default per loss: " + per_loss("lr") + ")",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW's decoupled weight decay (default per loss: " + per_loss("weight_decay") + ")",
    )
    g.add_argument(
        "--classes-per-batch",
        type=int,
        default=None,
        help="P of the class-balanced P x K batches; paired-contrastive with --mining none draws shuffled batches of "
        "P * K images instead (default per loss: " + per_loss("p") + ")",
    )
    g.add_argument(
        "--samples-per-class",
        type=int,
        default=None,
        help="K of the P x K batches (default per loss: " + per_loss("k") + ")",
    )
    g.add_argument(
        "--shift",
        type=int,
        default=None,
        help="augmentation: translate each training image by up to +-SHIFT pixels, 0: off (default per loss: "
        + per_loss("shift")
        + ")",
    )
    g.add_argument(
        "--rotate",
        type=float,
        default=None,
        help="augmentation: rotate each training image by up to +-ROTATE degrees, 0: off; with --rotate or "
        "--scale the shifts are continuous (bilinear) (default per loss: " + per_loss("rotate") + ")",
    )
    g.add_argument(
        "--scale",
        type=float,
        default=None,
        help="augmentation: zoom each training image by a factor in [1 - SCALE, 1 + SCALE], 0: off (default "
        "per loss: " + per_loss("scale") + ")",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batch order")
    g = parser.add_argument_group("data and run")
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four MNIST IDX files (.gz or not); default: the project's data/mnist, "
        "then the cache ($FASTDML_DATA_DIR or ~/.cache/fastdml/mnist), then a download",
    )
    g.add_argument("--no-download", action="store_true", help="never download the data")
    g.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    g.add_argument("--test-subset", type=int, default=None, help="use only the first N test images")
    g.add_argument(
        "--validation",
        type=int,
        default=0,
        help="hold out the last N training images and evaluate on them instead of the test set (for choosing "
        "settings without looking at the test set; 0: off)",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available, else cpu"
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--out", default=None, help="output folder (default: runs/<UTC timestamp>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch lines remain)")
    return parser


def snapshot_epochs(epochs: int) -> list[int]:
    """The epochs drawn in ``progress.png``: before training, 1, 2, a quarter, half way, the last (<= 6)."""
    return sorted({0, 1, min(2, epochs), epochs // 4, epochs // 2, epochs})


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastdml-demo: --device cuda, but torch sees no CUDA device")
    return choice


def _mining_label(mining: str) -> str:
    return {"none": "all pairs", "batch-all": "all triplets"}.get(mining, f"{mining} mining")


def _batch_label(config) -> str:
    if config.sampler == "pk":
        return f"{config.p} x {config.k} (classes x samples)"
    return f"shuffled {config.p * config.k}-image"


def _positive(parser, args, names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_options(parser, args) -> None:
    """Reject every option value that cannot give a meaningful run, naming the option (argparse exit 2)."""
    _positive(
        parser,
        args,
        ("dim", "width", "hidden", "epochs", "classes_per_batch", "samples_per_class", "train_subset", "threads"),
    )
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    for name in ("margin", "pos_margin", "positive_weight"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.reducer is not None and args.loss == "paired-contrastive":
        parser.error(
            f"--reducer applies to --loss contrastive and triplet only (paired-contrastive averages over its "
            f"mined pairs), got --reducer {args.reducer}"
        )
    if args.shift is not None and not 0 <= args.shift <= MAX_SHIFT:
        parser.error(f"--shift must be in [0, {MAX_SHIFT}] pixels, got {args.shift}")
    if args.rotate is not None and not (math.isfinite(args.rotate) and 0 <= args.rotate <= MAX_ROTATE):
        parser.error(f"--rotate must be in [0, {MAX_ROTATE:g}] degrees, got {args.rotate}")
    if args.scale is not None and not (math.isfinite(args.scale) and 0 <= args.scale <= MAX_SCALE):
        parser.error(f"--scale must be in [0, {MAX_SCALE:g}], got {args.scale}")
    if args.classes_per_batch is not None and args.classes_per_batch > N_CLASSES:
        parser.error(
            f"--classes-per-batch must be <= {N_CLASSES} (MNIST has {N_CLASSES} digits), got {args.classes_per_batch}"
        )
    if args.test_subset is not None and args.test_subset < 2:
        parser.error(
            f"--test-subset must be >= 2 (each test image is a query against the others), got {args.test_subset}"
        )
    if args.validation < 0:
        parser.error(f"--validation must be >= 0, got {args.validation}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} names an existing file, not a folder")


def _check_batches(parser, args, config, y_train, y_test) -> None:
    """Checks that need the data: enough classes and images for the batches, a query set with neighbours."""
    import numpy as np

    if config.sampler == "pk":
        if config.k < 2:
            parser.error(
                f"--samples-per-class must be >= 2 for --loss {args.loss}: with 1 image per class a batch "
                "holds no positive pair, got 1"
            )
        present = len(np.unique(y_train))
        if config.p > present:
            parser.error(
                f"--classes-per-batch {config.p} exceeds the {present} digits present in the "
                f"{len(y_train)} training images (--train-subset)"
            )
    else:
        size = config.p * config.k
        if size < 2:
            parser.error(
                f"--classes-per-batch x --samples-per-class = {size}: --loss {args.loss} needs batches of at "
                "least 2 images (one pair)"
            )
        if len(y_train) < size:
            parser.error(
                f"--train-subset {len(y_train)} is smaller than one batch of --classes-per-batch x "
                f"--samples-per-class = {size} images"
            )
    if np.bincount(y_test).max(initial=0) < 2:
        parser.error(
            f"the {len(y_test)} evaluation images hold no digit twice: precision@1 has no neighbour to find "
            "(raise --test-subset or --validation)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)

    import torch

    from .data import MnistDataError, MnistSplit, load_mnist
    from .plot import plot_embedding, plot_loss, plot_progress
    from .recipes import DEFAULTS, build_recipe
    from .train import TrainConfig, TrainingDiverged, embed, evaluate, to_tensor, train

    try:
        recipe = build_recipe(args.loss, args.mining, args.margin, args.pos_margin, args.positive_weight, args.reducer)
    except ValueError as exc:
        parser.error(str(exc))

    def option(name: str, key: str | None = None):
        """``--name`` as given, else the loss's default ``DEFAULTS[loss][key or name]``."""
        value = getattr(args, name)
        return DEFAULTS[args.loss][key or name] if value is None else value

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    config = TrainConfig(
        epochs=option("epochs"),
        lr=option("lr"),
        weight_decay=option("weight_decay"),
        p=option("classes_per_batch", "p"),
        k=option("samples_per_class", "k"),
        width=option("width"),
        hidden=args.hidden,
        dim=args.dim,
        seed=args.seed,
        device=device,
        sampler="random" if recipe.mining == "none" and args.loss == "paired-contrastive" else "pk",
        progress=not args.no_progress,
        shift=option("shift"),
        rotate=option("rotate"),
        scale=option("scale"),
    )
    out = Path(args.out or os.path.join("runs", _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")))

    try:
        train_split = load_mnist("train", args.data_dir, download=not args.no_download)
        test_split = load_mnist("test", args.data_dir, download=not args.no_download)
    except MnistDataError as exc:
        print(f"fastdml-demo: {exc}", file=sys.stderr)
        return 2
    if args.validation:
        if args.validation >= len(train_split):
            parser.error(f"--validation must be < {len(train_split)} (the training images), got {args.validation}")
        # the held-out tail of the training set plays the test set; the test set is not read
        held = len(train_split) - args.validation
        test_split = MnistSplit(train_split.images[held:], train_split.labels[held:])
        train_split = MnistSplit(train_split.images[:held], train_split.labels[:held])
    n_train = min(args.train_subset or len(train_split), len(train_split))
    n_test = min(args.test_subset or len(test_split), len(test_split))
    x_train = to_tensor(train_split.images[:n_train], device)
    y_train = torch.from_numpy(train_split.labels[:n_train]).to(device)
    x_test = to_tensor(test_split.images[:n_test], device)
    y_test = torch.from_numpy(test_split.labels[:n_test]).to(device)
    _check_batches(parser, args, config, train_split.labels[:n_train], test_split.labels[:n_test])
    out.mkdir(parents=True, exist_ok=True)

    print(
        f"fastdml-demo: loss {recipe.loss}, mining {recipe.mining}, margin {recipe.margin}, dim {config.dim}, "
        f"{config.epochs} epochs of {n_train} images in {_batch_label(config)} batches, device {device}, "
        f"{torch.get_num_threads()} threads -> {out}",
        flush=True,
    )
    shown = snapshot_epochs(config.epochs)
    snapshots = []  # (epoch, embeddings of the first SNAPSHOT_IMAGES evaluation images)

    def snapshot(epoch, model):
        if epoch in shown:
            snapshots.append((epoch, embed(model, x_test[:SNAPSHOT_IMAGES]).cpu().numpy()))

    try:
        result = train(recipe, x_train, y_train, config, log=lambda line: print(line, flush=True), on_epoch=snapshot)
    except TrainingDiverged as exc:
        print(f"fastdml-demo: {exc}; try a smaller --lr (this run: --lr {config.lr:g})", file=sys.stderr)
        return 1

    e_train, e_test = embed(result.model, x_train), embed(result.model, x_test)
    metrics = evaluate(e_train, y_train, e_test, y_test)
    record = {
        **{key: float(value) for key, value in metrics.items()},
        "train_seconds": round(result.train_seconds, 2),
        "train_cpu_seconds": round(result.cpu_seconds, 2),
        "epochs": config.epochs,
        "steps": result.steps,
        "loss": recipe.loss,
        "mining": recipe.mining,
        "margin": recipe.margin,
        "pos_margin": recipe.pos_margin if recipe.loss != "triplet" else None,
        "positive_weight": recipe.positive_weight if recipe.loss == "paired-contrastive" else None,
        "reducer": recipe.reducer,
        "dim": config.dim,
        "width": config.width,
        "hidden": config.hidden,
        "batch": _batch_label(config),
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "shift": config.shift,
        "rotate": config.rotate,
        "scale": config.scale,
        "seed": config.seed,
        "device": device,
        "threads": torch.get_num_threads(),
        "train_images": n_train,
        "test_images": n_test,
        "evaluated_on": f"validation (last {args.validation} training images)" if args.validation else "test set",
        "final_loss": result.epoch_losses[-1] if result.epoch_losses else None,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        # other jobs on a shared CPU stretch train_seconds (not train_cpu_seconds): record how busy it was
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "command": "fastdml-demo " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    torch.save({"state_dict": result.model.state_dict(), "config": vars(config), "metrics": record}, out / "model.pt")
    summary = (
        f"P@1 {metrics['precision_at_1']:.2%}  R-precision {metrics['r_precision']:.2%}  "
        f"MAP@R {metrics['mean_average_precision_at_r']:.2%}  1-NN acc {metrics['knn_accuracy']:.2%}"
    )
    plot_embedding(
        e_test.cpu().numpy(),
        y_test.cpu().numpy(),
        out / "embedding.png",
        title=f"MNIST {'validation images' if args.validation else 'test set'}, {recipe.loss} loss "
        f"({_mining_label(recipe.mining)}), dim {config.dim}",
        subtitle=summary,
    )
    plot_progress(
        snapshots,
        y_test[:SNAPSHOT_IMAGES].cpu().numpy(),
        result.losses,
        out / "progress.png",
        steps_per_epoch=max(1, result.steps // max(config.epochs, 1)),
        title=f"Learning the embedding: {recipe.loss} loss ({_mining_label(recipe.mining)}), dim {config.dim}, "
        f"{min(SNAPSHOT_IMAGES, n_test)} {'validation' if args.validation else 'test'} images; {summary}",
    )
    plot_loss(
        result.losses,
        out / "loss.png",
        steps_per_epoch=max(1, result.steps // max(config.epochs, 1)),
        title=f"{recipe.loss} loss ({_mining_label(recipe.mining)})",
    )
    print(
        f"{recipe.loss}/{recipe.mining}: {summary}  train {result.train_seconds:.1f} s "
        f"({config.epochs} epochs, {device})  -> {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The contrastive step on the CPU with and without the compiled tile, against PML, in one process:
``ContrastiveLoss()(x, y)`` forward+backward (D = 128, fp32), three variants timed call by call in a
rotating order so that the machine's drifts hit every variant alike:

- ``compiled``: the default (the square sweep with ``csrc/contrastive_tile.c``);
- ``torch-ops``: no compiled helper (``native.disabled()``; as without a C compiler or ``FASTDML_NATIVE=0``);
- ``pml``: PML's identical call.

With ``--after-pml`` every fastdml step is timed right after an untimed PML call (as half the samples of the
alternating headline protocol are). Prints the medians and the ratios::

    python -m bench.experiments.contrastive                     # N = 1024, 10 random classes, 100 rounds
    python -m bench.experiments.contrastive --after-pml --rounds 60
    python -m bench.experiments.contrastive --labels pk4 --neg-margin 2.0 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

VARIANTS = ("compiled", "torch-ops", "pml")


def run(n: int, rounds: int, labels: str, neg_margin: float, after_pml: bool, seed: int = 0) -> dict:
    """``{variant: median seconds}`` over ``rounds`` rounds (the first three are warm-up)."""
    import pytorch_metric_learning.losses as pml_losses

    from fastdml import losses
    from fastdml.blocked import native

    torch.manual_seed(seed)
    x = torch.randn(n, 128, requires_grad=True)
    y = torch.randint(0, 10, (n,)) if labels == "random10" else torch.randperm(n) // 4
    ours, theirs = losses.ContrastiveLoss(neg_margin=neg_margin), pml_losses.ContrastiveLoss(neg_margin=neg_margin)

    def step(fn):
        fn(x, y).backward()
        x.grad = None

    setting = {"compiled": contextlib.nullcontext, "torch-ops": native.disabled, "pml": contextlib.nullcontext}
    times = {v: [] for v in VARIANTS}
    for r in range(rounds + 3):
        for k in range(len(VARIANTS)):
            variant = VARIANTS[(r + k) % len(VARIANTS)]
            fn = theirs if variant == "pml" else ours
            with setting[variant]():
                if after_pml and variant != "pml":
                    step(theirs)
                t = time.perf_counter()
                step(fn)
                dt = time.perf_counter() - t
            if r >= 3:
                times[variant].append(dt)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--labels", default="random10", choices=("random10", "pk4"))
    ap.add_argument("--neg-margin", type=float, default=1.0)
    ap.add_argument("--after-pml", action="store_true", help="an untimed PML call before every fastdml step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from fastdml.blocked import native

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compiled helpers: {native.status()}")
    res = run(args.n, args.rounds, args.labels, args.neg_margin, args.after_pml)
    after = "fastdml after PML's call" if args.after_pml else "back to back"
    print(f"contrastive step, N={args.n}, D=128, fp32, {args.labels}, neg_margin={args.neg_margin}, {after}, "
          f"medians of {args.rounds} rounds:")  # fmt: skip
    for v in VARIANTS:
        print(f"  {v:10s} {res[v] * 1e3:8.3f} ms")
    c, t, p = res["compiled"], res["torch-ops"], res["pml"]
    print(f"  compiled / torch-ops {c / t:.3f};  PML / compiled {p / c:.2f}x;  PML / torch-ops {p / t:.2f}x")


if __name__ == "__main__":
    main()

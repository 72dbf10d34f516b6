"""What the compiled CPU helpers (fastdml/blocked/native.py) save: the batch-hard step (``TripletMarginLoss`` +
``BatchHardMiner``, D = 128, fp32, 10 classes, forward+backward) in three variants, alternating call by call
in one process so that the machine's drifts hit every variant alike:

- ``compiled``: the default (the upper-triangle strips with the compiled strip scan, the compiled
  chosen-triplet loss);
- ``row-blocks``: the compiled helpers, but the square sweep by row blocks over the full GEMM (as for
  rectangular inputs);
- ``torch-ops``: no compiled helper (``native.disabled()``; as without a C compiler or with
  ``FASTDML_NATIVE=0``).

With ``--pml``, every timed step follows PML's identical call (as half the samples of the alternating
headline protocol do). Prints the median of each variant::

    python -m bench.experiments.native                    # N = 1024, 150 rounds
    python -m bench.experiments.native --pml --rounds 60
    python -m bench.experiments.native --n 4096 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = ("compiled", "row-blocks", "torch-ops")


def run(n: int, rounds: int, pml: bool, seed: int = 0) -> dict:
    """``{variant: median seconds}`` of the batch-hard step over ``rounds`` rounds (variants in a rotating order)."""
    import contextlib
    from unittest import mock

    from fastdml import losses, miners
    from fastdml.blocked import hardest, native

    torch.manual_seed(seed)
    x = torch.randn(n, 128, requires_grad=True)
    y = torch.randint(0, 10, (n,))
    loss_fn, miner = losses.TripletMarginLoss(), miners.BatchHardMiner()
    pml_step = None
    if pml:
        import pytorch_metric_learning.losses as pml_losses
        import pytorch_metric_learning.miners as pml_miners

        pml_loss, pml_miner = pml_losses.TripletMarginLoss(), pml_miners.BatchHardMiner()

        def pml_step():
            pml_loss(x, y, pml_miner(x, y)).backward()
            x.grad = None

    def setting(variant):
        if variant == "torch-ops":
            return native.disabled()
        if variant == "row-blocks":
            return mock.patch.object(hardest, "_square_strips", lambda P, canon: False)
        return contextlib.nullcontext()

    def step():
        loss_fn(x, y, miner(x, y)).backward()
        x.grad = None

    times = {v: [] for v in VARIANTS}
    for r in range(rounds + 3):
        for k in range(len(VARIANTS)):
            variant = VARIANTS[(r + k) % len(VARIANTS)]
            with setting(variant):
                if pml_step is not None:
                    pml_step()
                t = time.perf_counter()
                step()
                dt = time.perf_counter() - t
            if r >= 3:  # (warm-up rounds)
                times[variant].append(dt)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--pml", action="store_true", help="PML's identical call before every timed step")
    args = ap.parse_args(argv)
    from fastdml.blocked import native

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compiled helpers: {native.status()}")
    res = run(args.n, args.rounds, args.pml)
    after = "after PML's call" if args.pml else "back to back"
    print(f"batch-hard step, N={args.n}, D=128, fp32, {after}, medians of {args.rounds} rounds:")
    for v in VARIANTS:
        print(f"  {v:11s} {res[v] * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()

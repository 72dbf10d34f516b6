"""What slows a short fastdml call that follows other work: the batch-hard step (``TripletMarginLoss`` +
``BatchHardMiner``, N = 1024, D = 128, fp32, 10 classes, forward+backward) timed right after each of

- ``none``: nothing (back-to-back fastdml steps),
- ``pml``: PML's identical call (what the alternating headline benchmark does),
- ``sleep``: ``time.sleep(0.022)`` (an idle CPU for about as long as PML's call),
- ``alloc``: allocating, filling and freeing 30 MB (about PML's working memory at this size),
- ``pml+small``: PML's call, then the same fastdml call on a 64-row batch (warms fastdml's code paths, not its
  data),
- ``read``: reading 32 MB (evicts the caches' data, runs no other code).

Prints the median of 35 steps (after 5 warm-up steps) of the miner, the loss forward, the backward and the
whole step, per case::

    python bench/bench_idle.py                  # every case, torch's default thread count
    python bench/bench_idle.py --threads 1 --cases none,sleep
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(values) -> float:
    return statistics.median(values) * 1e3


def run(case: str, steps: int = 40, warmup: int = 5) -> dict:
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners

    from fastdml import losses, miners

    torch.manual_seed(0)
    x = torch.randn(1024, 128, requires_grad=True)
    y = torch.randint(0, 10, (1024,))
    loss_fn, miner = losses.TripletMarginLoss(), miners.BatchHardMiner()
    pml_loss, pml_miner = pml_losses.TripletMarginLoss(), pml_miners.BatchHardMiner()

    xs = torch.randn(64, 128, requires_grad=True)
    ys = torch.randint(0, 10, (64,))
    big = torch.randn(8 * 2**20)

    def before():
        if case in ("pml", "pml+small"):
            pml_loss(x, y, pml_miner(x, y)).backward()
            x.grad = None
        if case == "pml+small":
            # the same fastdml call on a 64-row batch: the same code paths, little of the same data
            loss_fn(xs, ys, miner(xs, ys)).backward()
            xs.grad = None
        elif case == "read":
            big.sum()
        elif case == "sleep":
            time.sleep(0.022)
        elif case == "alloc":
            buf = torch.empty(30 * 2**18).fill_(1.0)
            del buf
        elif case not in ("none", "pml"):
            raise ValueError(f"unknown case {case!r}")

    parts = {"miner": [], "loss": [], "backward": [], "step": []}
    for i in range(steps):
        before()
        t0 = time.perf_counter()
        mined = miner(x, y)
        t1 = time.perf_counter()
        loss = loss_fn(x, y, mined)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        x.grad = None
        if i >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    return {k: _median_ms(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cases", default="none,pml,pml+small,read,sleep,alloc")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch-hard step, N=1024, D=128, medians (ms)")
    for case in args.cases.split(","):
        r = run(case)
        print(f"after {case:9s}  " + "  ".join(f"{k} {v:6.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()

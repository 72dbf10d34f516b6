"""What slows a short fastdml call that follows other work: the batch-hard step (``TripletMarginLoss`` +
``BatchHardMiner``, N = 1024, D = 128, fp32, 10 classes, forward+backward) timed right after each of

- ``none``: nothing (back-to-back fastdml steps),
- ``pml``: PML's identical call (what the alternating headline benchmark does),
- ``sleep``: ``time.sleep(0.022)`` (an idle CPU for about as long as PML's call),
- ``alloc``: allocating, filling and freeing 30 MB (about PML's working memory at this size),
- ``pml+small``: PML's call, then the same fastdml call on a 64-row batch (warms fastdml's code paths, not its
  data),
- ``pml+gemm``: PML's call, then the (N, N) GEMM of the same rows on every thread (warms the worker threads,
  the GEMM's code and the rows, not fastdml's other code),
- ``pml+spin``: PML's call, then 2 ms of busy waiting (time passes, the CPU stays busy, nothing is warmed),
- ``read``: reading 32 MB (evicts the caches' data, runs no other code).

The cases are interleaved: every round runs each case once, in a shuffled order (seeded), so a drift of the
machine's speed during the run hits every case alike. Prints the median over the rounds (after 5 warm-up
rounds) of the miner, the loss forward, the backward and the whole step, per case::

    python -m bench.experiments.idle                  # every case, torch's default thread count
    python -m bench.experiments.idle --threads 1 --cases none,pml,sleep
    python -m bench.experiments.idle --series 30      # back-to-back steps only: the median of every 50, for 30 s
    python -m bench.experiments.idle --call contrastive   # ContrastiveLoss() instead (no miner: its part reads 0)

``--series`` shows the machine's own speed changing under a steady load (no other work in between).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(values) -> float:
    return statistics.median(values) * 1e3


CASES = ("none", "pml", "pml+small", "pml+gemm", "pml+spin", "read", "sleep", "alloc")


CALLS = ("batch_hard", "contrastive")


def _objects(call: str, lib):
    """``(loss_fn, miner or None)`` of ``call`` from ``lib``'s losses and miners modules."""
    losses, miners = lib
    if call == "contrastive":
        return losses.ContrastiveLoss(), None
    return losses.TripletMarginLoss(), miners.BatchHardMiner()


def _setup(call: str = "batch_hard"):
    """The timed step's inputs and fastdml objects: ``(x, y, loss_fn, miner or None)``, seeded."""
    from fastdml import losses, miners

    if call not in CALLS:
        raise ValueError(f"unknown call {call!r}; choose from {CALLS}")
    torch.manual_seed(0)
    x = torch.randn(1024, 128, requires_grad=True)
    y = torch.randint(0, 10, (1024,))
    return (x, y, *_objects(call, (losses, miners)))


def _mine(miner, x, y):
    return None if miner is None else miner(x, y)


def _loss(loss_fn, x, y, mined):
    return loss_fn(x, y) if mined is None else loss_fn(x, y, mined)


def run(cases, rounds: int = 40, warmup: int = 5, call: str = "batch_hard") -> dict:
    """``{case: {part: median ms}}`` over ``rounds`` interleaved rounds (see the module docstring)."""
    import random

    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners

    for case in cases:
        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    x, y, loss_fn, miner = _setup(call)
    pml_loss, pml_miner = _objects(call, (pml_losses, pml_miners))

    xs = torch.randn(64, 128, requires_grad=True)
    ys = torch.randint(0, 10, (64,))
    big = torch.randn(8 * 2**20)

    def before(case):
        if case.startswith("pml"):
            _loss(pml_loss, x, y, _mine(pml_miner, x, y)).backward()
            x.grad = None
        if case == "pml+small":
            # the same fastdml call on a 64-row batch: the same code paths, little of the same data
            _loss(loss_fn, xs, ys, _mine(miner, xs, ys)).backward()
            xs.grad = None
        elif case == "pml+gemm":
            torch.mm(x.detach(), x.detach().t())
        elif case == "pml+spin":
            t = time.perf_counter()
            while time.perf_counter() - t < 0.002:
                pass
        elif case == "read":
            big.sum()
        elif case == "sleep":
            time.sleep(0.022)
        elif case == "alloc":
            buf = torch.empty(30 * 2**18).fill_(1.0)
            del buf

    parts = {case: {"miner": [], "loss": [], "backward": [], "step": []} for case in cases}
    order = list(cases)
    rng = random.Random(0)
    for i in range(warmup + rounds):
        rng.shuffle(order)
        for case in order:
            before(case)
            t0 = time.perf_counter()
            mined = _mine(miner, x, y)
            t1 = time.perf_counter()
            loss = _loss(loss_fn, x, y, mined)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            x.grad = None
            if i >= warmup:
                for k, v in zip(parts[case], (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    parts[case][k].append(v)
    return {case: {k: _median_ms(v) for k, v in p.items()} for case, p in parts.items()}


def series(seconds: float, per: int = 50, call: str = "batch_hard") -> list:
    """Back-to-back steps for ``seconds``: the median of every ``per`` steps (ms), in order."""
    x, y, loss_fn, miner = _setup(call)

    def step():
        _loss(loss_fn, x, y, _mine(miner, x, y)).backward()
        x.grad = None

    for _ in range(10):
        step()
    out, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        ts = []
        for _ in range(per):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        out.append(_median_ms(ts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds (each runs every case once)")
    ap.add_argument("--series", type=float, default=0.0, help="seconds of back-to-back steps instead (see above)")
    ap.add_argument("--call", default="batch_hard", choices=CALLS, help="the timed step (contrastive: no miner)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.call} step, N=1024, D=128"
    if args.series > 0:
        print(f"{head}, back to back, median of every 50 steps (ms):")
        print(" ".join(f"{v:.2f}" for v in series(args.series, call=args.call)))
        return
    print(f"{head}, medians (ms)")
    for case, r in run(args.cases.split(","), args.rounds, call=args.call).items():
        print(f"after {case:9s}  " + "  ".join(f"{k} {v:6.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()

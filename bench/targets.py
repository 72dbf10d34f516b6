"""The headline comparison's cases and protocol: the drop-in API against PML's identical call.

Targets at N = 1024, D = 128, fp32, 10 random classes, forward+backward, with their CPU goals (speed-up and
less memory against PML). ``bench/test_bench_targets.py`` times them; ``bench/experiments`` reuses them.
"""

from __future__ import annotations

import time

from bench import _cases

TARGETS = {
    # name: (family, variant, speed-up goal, memory goal)
    "all_triplets": ("all_triplets", "TripletMarginLoss", 100.0, 50.0),
    "semihard_miner": ("semihard", "TML_SemihardMiner", 10.0, 3.0),
    "contrastive": ("contrastive", "ContrastiveLoss", 3.0, 4.0),
    "batch_hard_miner": ("batch_hard", "TML_BatchHardMiner", 5.0, 4.0),
}
TARGET_N, TARGET_D = 1024, 128


def timed(step) -> float:
    """Seconds one call of ``step`` takes."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def target_case(name: str, n: int = TARGET_N, d: int = TARGET_D, device: str = "cpu") -> _cases.Case:
    """fastdml's case of target ``name``: forward+backward, fp32, 10 random classes (PML's case:
    ``.replace(impl="pml")``)."""
    family, variant, _, _ = TARGETS[name]
    return _cases.Case(family, variant, "fastdml", "fwdbwd", n, d, "float32", "random10", device)


def alternate(step_fd, step_pm, rounds: int) -> tuple[list, list]:
    """The headline's protocol: ``rounds`` rounds timing both calls, in the order fastdml, PML, PML, fastdml,
    ... (a change in the machine's load hits both alike). Returns the two lists of seconds."""
    t_fd, t_pm = [], []
    for r in range(rounds):
        order = ((t_fd, step_fd), (t_pm, step_pm)) if r % 2 == 0 else ((t_pm, step_pm), (t_fd, step_fd))
        for sink, step in order:
            sink.append(timed(step))
    return t_fd, t_pm

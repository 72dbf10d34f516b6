"""Re-derive ``bench._cases._SECONDS_PER_WORK`` (the per-unit time costs the suites use to skip baselines
that would take too long) on this machine.

For each (implementation, triplet family or not) it times one modest case (median of ``--calls`` calls after a
warm-up) and divides by :func:`bench._cases.work`; it prints the measured table beside the one in
``_cases.py``. Memory formulas: check a case with ``python -m bench._memory <case id>``::

    python -m bench.calibrate                 # N = 256, D = 128, fp32, CPU
    python -m bench.calibrate --n 512 --calls 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import _cases

# one representative variant per (implementation, triplet family)
_PROBES = {
    ("pml", True): ("all_triplets", "TripletMarginLoss"),
    ("pml", False): ("contrastive", "ContrastiveLoss"),
    ("reference", True): ("all_triplets", "TripletMarginLoss"),
    ("reference", False): ("contrastive", "ContrastiveLoss"),
    ("fastdml", True): ("all_triplets", "TripletMarginLoss"),
    ("fastdml", False): ("contrastive", "ContrastiveLoss"),
}


def seconds_per_work(impl: str, triplets: bool, n: int, d: int, calls: int, device: str = "cpu") -> float:
    family, variant = _PROBES[(impl, triplets)]
    case = _cases.Case(family, variant, impl, "fwdbwd", n, d, "float32", "random10", device)
    step = _cases.make_step(case, *_cases.make_inputs(case))
    step()  # warm-up
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / _cases.work(case)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"seconds per unit of work, N={args.n}, D={args.d}, fp32, cpu (measured / in _cases.py):")
    for key in _PROBES:
        try:
            got = seconds_per_work(*key, args.n, args.d, args.calls)
        except _cases.Unavailable as exc:
            print(f"  {key}: unavailable ({exc})")
            continue
        print(f"  {key!s:22s} {got:.2e} / {_cases._SECONDS_PER_WORK[key]:.0e}")


if __name__ == "__main__":
    main()

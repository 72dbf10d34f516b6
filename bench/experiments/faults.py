"""Page faults and time per call of the headline calls, with the blocked path's workspace kept from call to
call (the default) or released before every call (what every call paid before the workspace existed).

For each target call of ``bench/targets.py`` (N = 1024, D = 128, fp32, 10 classes,
forward+backward through the drop-in API) it prints the median over ``--calls`` calls (after 3 warm-up
calls) of the wall time and of the minor page faults (``getrusage``), the two modes alternating call by
call so that a change in the machine's load hits both alike::

    python -m bench.experiments.faults
    python -m bench.experiments.faults --targets all_triplets --calls 30
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from bench import _cases
from bench.targets import TARGET_D, TARGET_N, TARGETS, target_case
from fastdml.blocked import workspace


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(name: str, calls: int) -> dict:
    case = target_case(name)
    x, y = _cases.make_inputs(case)
    step = _cases.make_step(case, x, y)
    for _ in range(3):
        step()
    out = {mode: {"s": [], "faults": []} for mode in ("kept", "released")}
    for i in range(2 * calls):
        mode = ("kept", "released")[(i + i // 2) % 2]  # kept, released, released, kept, ...
        if mode == "released":
            workspace.release()
        f0, t0 = _faults(), time.perf_counter()
        step()
        t1, f1 = time.perf_counter(), _faults()
        out[mode]["s"].append(t1 - t0)
        out[mode]["faults"].append(f1 - f0)
    return {m: (statistics.median(v["s"]) * 1e3, statistics.median(v["faults"])) for m, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={TARGET_N}, D={TARGET_D}, fp32, "
        f"medians of {args.calls} calls (ms, minor page faults)"
    )
    for name in args.targets.split(","):
        r = measure(name, args.calls)
        print(
            f"{name:18s} workspace kept: {r['kept'][0]:7.2f} ms {r['kept'][1]:7.0f} faults   "
            f"released: {r['released'][0]:7.2f} ms {r['released'][1]:7.0f} faults"
        )


if __name__ == "__main__":
    main()

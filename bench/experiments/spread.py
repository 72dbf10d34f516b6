"""The spread of a headline ratio: one target of ``bench/targets.py`` (fastdml's drop-in call
against PML's identical call, N = 1024, D = 128, fp32, 10 classes, forward+backward) with many alternating
rounds, repeated in fresh processes.

The headline run takes 20 alternating rounds, and its ratio moves from run to run on a shared machine. This
tool shows how much of that a longer run removes: each repeat runs ``--rounds`` rounds (fastdml, PML, PML,
fastdml, ... as the headline does) in a new process and prints the medians and their ratio::

    python -m bench.experiments.spread                          # batch_hard_miner, 3 repeats of 200 rounds
    python -m bench.experiments.spread --target contrastive --repeats 5 --rounds 100
    python -m bench.experiments.spread --window 20              # also the medians of every 20 consecutive rounds

The windows show the machine's speed changing under a run (bench/RESULTS.md, "Spread of the batch-hard
ratio").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench.targets import TARGETS, alternate, target_case


def run_once(name: str, rounds: int, window: int = 0) -> dict:
    """Medians of ``rounds`` alternating rounds of target ``name`` in this process (seconds); with ``window``,
    also ``windows``: the two medians of every ``window`` consecutive rounds."""
    from bench import _cases

    fd = target_case(name)
    pm = fd.replace(impl="pml")
    x, y = _cases.make_inputs(fd)
    step_fd, step_pm = _cases.make_step(fd, x, y), _cases.make_step(pm, x, y)
    for _ in range(3):
        step_fd()
        step_pm()
    t_fd, t_pm = alternate(step_fd, step_pm, rounds)
    out = {"fastdml_s": statistics.median(t_fd), "pml_s": statistics.median(t_pm)}
    if window > 0:
        spans = range(0, rounds - window + 1, window)
        med = statistics.median
        out["windows"] = [(med(t_fd[i : i + window]), med(t_pm[i : i + window])) for i in spans]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="batch_hard_miner", choices=sorted(TARGETS))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=0, help="also print the medians of every WINDOW rounds")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # (the child process)
    args = ap.parse_args()
    if args.once:
        print(json.dumps(run_once(args.target, args.rounds, args.window)))
        return
    ratios = []
    for i in range(args.repeats):
        cmd = [sys.executable, "-m", "bench.experiments.spread", "--once", "--target", args.target]
        cmd += ["--rounds", str(args.rounds), "--window", str(args.window)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        ratio = r["pml_s"] / r["fastdml_s"]
        ratios.append(ratio)
        print(
            f"{args.target} repeat {i + 1}: {args.rounds} rounds, fastdml {r['fastdml_s'] * 1e3:.2f} ms, "
            f"PML {r['pml_s'] * 1e3:.2f} ms, ratio {ratio:.2f}x",
            flush=True,
        )
        if "windows" in r:
            cells = (f"{a * 1e3:.2f}/{b * 1e3:.1f} {b / a:.2f}x" for a, b in r["windows"])
            print("  windows (fastdml / PML ms, ratio): " + ", ".join(cells), flush=True)
    print(f"ratios: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x")


if __name__ == "__main__":
    main()

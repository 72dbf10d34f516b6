"""One-shot GPU timing table: fastdml vs pytorch-metric-learning vs the GEMM floor (run by bench/gpu_check.sh).

For each family and batch size N (D = 128, float32, P x K labels with K = 4 and, for N <= 4096, 10 random
classes too), one training step ``loss = f(x, y); loss.backward()`` is timed with CUDA events (median of a few
repeats after a warm-up) and its peak memory read with ``torch.cuda.max_memory_allocated`` (above the inputs):

==============  ===================================================  ============================================
family          fastdml                                              PML (same call)
==============  ===================================================  ============================================
batch_hard      ``TripletMarginLoss()(x, y, BatchHardMiner()(x, y))``  identical
contrastive     ``ContrastiveLoss()(x, y)``                          identical
batch_all       ``BatchAllTripletLoss()(x, y)``                      ``TripletMarginLoss(margin=0.2)`` + AvgNonZero
semihard        ``SemiHardTripletLoss()(x, y)``                      (no PML equivalent: TF-Addons semantics)
all_triplets    ``TripletMarginLoss()(x, y)``                        identical
==============  ===================================================  ============================================

The floor is ``torch.mm(x, x.T)`` forward and backward (the GEMM every distance-matrix method pays).
Cases predicted to need more memory than the card (PML's N^3 triplet masks) are skipped with the reason.
Every case runs under a time guard (SIGALRM) and in try/except, and the JSON and markdown outputs are
rewritten after each case, so one failure or hang never loses the table.

Usage: ``python bench/gpu_timing.py --out OUTDIR [--quick] [--budget-s 420]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback

import torch

D = 128
FAMILIES = ("batch_hard", "contrastive", "batch_all", "semihard", "all_triplets")


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout("case time limit")


def labels_for(pattern: str, n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if pattern == "pk4":
        y = torch.arange(n) // 4
        y = y[torch.randperm(n, generator=g)]
    else:  # random10
        y = torch.randint(0, 10, (n,), generator=g)
    return y.to(device)


def build(impl: str, family: str):
    """The loss callable ``f(x, y) -> loss`` for an implementation, or raise ``LookupError``."""
    if impl == "floor":
        return lambda x, y: torch.mm(x, x.t()).sum()
    if impl == "fastdml":
        from fastdml import losses, miners
    elif impl == "pml":
        try:
            from pytorch_metric_learning import losses, miners
        except ImportError as exc:
            raise LookupError(f"PML not importable: {exc}") from exc
    else:
        raise ValueError(impl)
    if family == "batch_hard":
        loss, miner = losses.TripletMarginLoss(), miners.BatchHardMiner()
        return lambda x, y: loss(x, y, miner(x, y))
    if family == "contrastive":
        loss = losses.ContrastiveLoss()
        return lambda x, y: loss(x, y)
    if family == "batch_all":
        if impl == "fastdml":
            loss = losses.BatchAllTripletLoss()
        else:
            loss = losses.TripletMarginLoss(margin=0.2)
        return lambda x, y: loss(x, y)
    if family == "semihard":
        if impl != "fastdml":
            raise LookupError("PML has no TF-Addons semi-hard loss")
        loss = losses.SemiHardTripletLoss()
        return lambda x, y: loss(x, y)
    if family == "all_triplets":
        loss = losses.TripletMarginLoss()
        return lambda x, y: loss(x, y)
    raise ValueError(family)


def predicted_bytes(impl: str, family: str, n: int, pattern: str) -> float:
    """Rough peak memory of a case (PML materializes N x N matrices and N^3 triplet masks)."""
    if impl == "floor":
        return 3 * 4 * n * n
    if impl == "fastdml":
        return 16 * n * n if family in ("batch_all", "semihard", "all_triplets") and n > 32768 else 8 * n * D * 4
    mat = 4 * n * n * 6
    if family in ("batch_all", "all_triplets"):
        return mat + 2 * n**3  # bool N^3 masks (matches x diffs)
    return mat


def time_case(fn, x, y, repeats: int, budget_s: float):
    """(median ms, peak extra bytes, loss value) of ``fn(x, y).backward()``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = fn(x, y)
    loss.backward()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    value = float(loss.detach())
    x.grad = None
    times = []
    reps = max(1, min(repeats, int(budget_s / max(first, 1e-4))))
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(x, y)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        x.grad = None
    times.sort()
    return times[len(times) // 2], peak, value, first


def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def write_outputs(out: str, rows: list, meta: dict) -> None:
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# fastdml GPU timing ({meta.get('device', '?')}, D = {D}, float32, fwd + bwd)",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}; median of repeats after a warm-up; "
        "peak = torch.cuda.max_memory_allocated above the inputs.",
        "",
        "| family | N | labels | impl | ms | peak MB | loss | ms / fastdml ms | note |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    fast = {(r["family"], r["n"], r["labels"]): r for r in rows if r["impl"] == "fastdml" and r.get("ms")}
    for r in rows:
        ref = fast.get((r["family"], r["n"], r["labels"]))
        ratio = "-"
        if ref and r.get("ms") and r["impl"] != "fastdml":
            ratio = f"{r['ms'] / ref['ms']:.2f}x"
        loss = "-" if r.get("loss") is None else f"{r['loss']:.6g}"
        lines.append(
            f"| {r['family']} | {r['n']} | {r['labels']} | {r['impl']} | {fmt_ms(r.get('ms'))} | "
            f"{fmt_mb(r.get('peak'))} | {loss} | {ratio} | {r.get('note', '')} |"
        )
    with open(os.path.join(out, "timing.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="N = 256 and 4096 only, one repeat")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this")
    ap.add_argument("--case-s", type=float, default=60.0, help="time guard of one case")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    total_mem = torch.cuda.get_device_properties(0).total_memory
    families = [f for f in args.families.split(",") if f]
    # N = 65,536 (fastdml only: the memory headline) runs right after 4096, before 8192, so that a short
    # --budget-s still reaches it
    sizes = [256, 4096] if args.quick else [256, 4096, 65536, 8192]
    plan = []
    for n in sizes:
        if n == 65536:
            for family in ("contrastive", "batch_hard", "semihard", "batch_all"):
                if family in families:
                    plan.append((family, 65536, "pk4", "fastdml"))
            plan.append((families[0], 65536, "pk4", "floor"))
            continue
        for family in families:
            for pattern in ("pk4", "random10") if n <= 4096 else ("pk4",):
                for impl in ("floor", "fastdml", "pml"):
                    if impl == "floor" and (family != families[0] or pattern != "pk4"):
                        continue
                    plan.append((family, n, pattern, impl))
    rows: list = []
    t_start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for family, n, pattern, impl in plan:
        row = {"family": family if impl != "floor" else "gemm_floor", "n": n, "labels": pattern, "impl": impl}
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            row["note"] = f"skipped: run budget ({args.budget_s:.0f} s) spent"
            rows.append(row)
            continue
        need = predicted_bytes(impl, family, n, pattern)
        if need > 0.8 * total_mem:
            row["note"] = f"skipped: predicted {need / 2**30:.0f} GiB > card"
            rows.append(row)
            write_outputs(args.out, rows, meta)
            continue
        x = y = None
        try:
            fn = build(impl, family)
            g = torch.Generator(device="cpu").manual_seed(n)
            x = torch.randn(n, D, generator=g).to(dev).requires_grad_(True)
            y = labels_for(pattern, n, dev)
            signal.alarm(int(min(args.case_s, max(5, args.budget_s - elapsed + 30))))
            ms, peak, value, first = time_case(
                fn, x, y, repeats=1 if args.quick else 5, budget_s=min(10.0, args.case_s / 3)
            )
            signal.alarm(0)
            row.update(ms=ms, peak=peak, loss=value, first_s=first)
            if impl == "fastdml":
                from fastdml import dispatch

                row["note"] = f"backend={dispatch.backend_for(x)}"
            if not math.isfinite(value):
                row["note"] = "non-finite loss"
            print(
                f"{row['family']:12s} N={n:6d} {pattern:8s} {impl:8s} {fmt_ms(ms):>9s} ms "
                f"peak {fmt_mb(peak):>9s} MB loss {value:.6g} (first call {first:.2f} s)",
                flush=True,
            )
        except LookupError as exc:
            signal.alarm(0)
            row["note"] = f"n/a: {exc}"
        except CaseTimeout:
            row["note"] = f"timeout after {args.case_s:.0f} s"
            print(f"TIMEOUT {family} {n} {pattern} {impl}", flush=True)
        except torch.cuda.OutOfMemoryError as exc:
            signal.alarm(0)
            row["note"] = "out of memory"
            print(f"OOM {family} {n} {pattern} {impl}: {exc}", flush=True)
        except Exception as exc:  # record and go on: the table must survive one broken case
            signal.alarm(0)
            row["note"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            print(f"ERROR {family} {n} {pattern} {impl}", flush=True)
            traceback.print_exc()
        finally:
            signal.alarm(0)
            del x, y
            torch.cuda.empty_cache()
        rows.append(row)
        write_outputs(args.out, rows, meta)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_outputs(args.out, rows, meta)
    print(open(os.path.join(args.out, "timing.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

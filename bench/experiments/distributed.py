"""Benchmark: fastdml's DistributedLossWrapper vs PML's on 2 gloo processes (CPU), and CrossBatchMemory with a
65,536-entry queue vs PML's (one process; on CUDA when available, else CPU; the queue is filled with random rows
first, then every timed step feeds a fresh random batch, as in training).

Every configuration runs in fresh processes, so the peak resident memory (``ru_maxrss``) is that
configuration's; the figure reported is the peak minus the RSS just before the first loss call (imports,
data and model excluded), the larger of the two ranks. Time: median of ``--iters`` forward+backward steps
after one warm-up, the slower of the two ranks.

    python -m bench.experiments.distributed                 # 2 x 512, D = 128, both parts
    python -m bench.experiments.distributed --part dist --per-rank 512 --dim 128 --iters 5
    python -m bench.experiments.distributed --part cbm --memory 65536 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make(impl, loss_name):
    """(loss, miner or None, wrapper classes) of fastdml or PML."""
    if impl == "fastdml":
        from fastdml import losses, miners
        from fastdml.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
    else:
        from pytorch_metric_learning import losses, miners
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper
    if loss_name == "contrastive":
        return (
            losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
            None,
            DistributedLossWrapper,
            DistributedMinerWrapper,
        )
    if loss_name == "batch_hard":
        return (
            losses.TripletMarginLoss(margin=0.2),
            miners.BatchHardMiner(),
            DistributedLossWrapper,
            DistributedMinerWrapper,
        )
    if loss_name == "batch_all":
        return losses.TripletMarginLoss(margin=0.2), None, DistributedLossWrapper, DistributedMinerWrapper
    raise ValueError(loss_name)


def _dist_rank(rank, world, port, cfg, queue):
    try:
        torch.set_num_threads(cfg["threads"])
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        loss, miner, LW, MW = _make(cfg["impl"], cfg["loss"])
        wrapper = LW(loss, efficient=cfg["efficient"])
        mwrap = None if miner is None else MW(miner, efficient=cfg["efficient"])
        g = torch.Generator().manual_seed(rank)
        n, d = cfg["per_rank"], cfg["dim"]
        torch.manual_seed(0)  # the same model on every rank, as DDP
        model = torch.nn.Linear(d, d)
        x_in = torch.randn(n, d, generator=g)
        y = torch.randint(0, cfg["classes"], (n,), generator=g)
        # a tiny warm-up step loads every lazily imported module before the baseline is taken
        emb = model(x_in[:16])
        idx = None if mwrap is None else mwrap(emb, y[:16])
        wrapper(emb, y[:16], idx).backward()
        model.zero_grad(set_to_none=True)
        torch.distributed.barrier()
        base = _rss_mb()
        times = []
        for it in range(cfg["iters"] + 1):
            torch.distributed.barrier()
            t = time.perf_counter()
            emb = model(x_in)
            idx = None if mwrap is None else mwrap(emb, y)
            val = wrapper(emb, y, idx)
            val.backward()
            model.zero_grad(set_to_none=True)
            if it:
                times.append(time.perf_counter() - t)
        queue.put(
            (
                rank,
                {"time_s": statistics.median(times), "peak_extra_mb": _peak_mb() - base, "loss": float(val.detach())},
                None,
            )
        )
    except Exception as exc:  # reported by the parent
        import traceback

        queue.put((rank, None, f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dist(cfg, world=2, timeout=900):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_rank, args=(r, world, port, cfg, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in range(world):
            rank, res, err = queue.get(timeout=timeout)
            if err:
                return {"error": err.splitlines()[0]}
            out.append(res)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {
        "time_s": max(r["time_s"] for r in out),
        "peak_extra_mb": max(r["peak_extra_mb"] for r in out),
        "loss": out[0]["loss"],
    }


def _cbm_proc(cfg, queue):
    try:
        torch.set_num_threads(cfg["threads"])
        device = cfg["device"]
        if cfg["impl"] == "fastdml":
            from fastdml import losses
            from fastdml.cross_batch_memory import CrossBatchMemory
        else:
            from pytorch_metric_learning import losses
            from pytorch_metric_learning.losses import CrossBatchMemory
        d, b, m = cfg["dim"], cfg["batch"], cfg["memory"]
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = torch.nn.Linear(d, d).to(device)
        # a tiny warm-up on a small memory loads every lazily imported module before the baseline is taken
        warm = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), d, memory_size=64).to(device)
        warm(model(torch.randn(16, d, generator=g).to(device)), torch.arange(16, device=device) % 4).backward()
        model.zero_grad(set_to_none=True)
        cbm = CrossBatchMemory(loss, d, memory_size=m).to(device)
        # fill the memory first (no timing), then time full-memory steps
        with torch.no_grad():
            cbm.embedding_memory.copy_(torch.randn(m, d, generator=g).to(device))
            cbm.label_memory.copy_(torch.randint(0, cfg["classes"], (m,), generator=g).to(device))
            cbm.has_been_filled = True
        # a fresh batch every step, as in training: re-feeding one batch would fill the queue with exact copies
        # of it (distance 0 to the query's older copies, an artificial case where PML's cdist gives small
        # non-zero distances that AvgNonZero counts, and fastdml's exact zeros are not counted)
        batches = [
            (torch.randn(b, d, generator=g).to(device), torch.randint(0, cfg["classes"], (b,), generator=g).to(device))
            for _ in range(cfg["iters"] + 1)
        ]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mb()
        times = []
        for it, (x_in, y) in enumerate(batches):
            t = time.perf_counter()
            val = cbm(model(x_in), y)
            val.backward()
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if it:
                times.append(time.perf_counter() - t)
        if device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = _peak_mb() - base
        queue.put(({"time_s": statistics.median(times), "peak_extra_mb": peak, "loss": float(val.detach())}, None))
    except Exception as exc:
        queue.put((None, repr(exc)))


def run_cbm(cfg, timeout=900):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_cbm_proc, args=(cfg, queue), daemon=True)
    p.start()
    try:
        res, err = queue.get(timeout=timeout)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return {"error": err} if err else res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["dist", "cbm", "all"], default="all")
    ap.add_argument("--per-rank", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--losses", default="contrastive,batch_hard,batch_all")
    ap.add_argument("--memory", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    results = []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    if args.part in ("dist", "all"):
        print(f"\n2-process gloo (CPU), {args.per_rank} per rank, D={args.dim}, {args.classes} classes", flush=True)
        print(f"{'loss':12s} {'efficient':9s} {'impl':8s} {'time/step':>10s} {'peak extra':>11s} {'loss value':>11s}")
        for loss_name in args.losses.split(","):
            for efficient in (False, True):
                for impl in ("pml", "fastdml"):
                    cfg = dict(
                        impl=impl,
                        loss=loss_name,
                        efficient=efficient,
                        per_rank=args.per_rank,
                        dim=args.dim,
                        classes=args.classes,
                        iters=args.iters,
                        threads=args.threads,
                    )
                    r = run_dist(cfg)
                    results.append({"part": "dist", **cfg, **r})
                    if "error" in r:
                        print(f"{loss_name:12s} {str(efficient):9s} {impl:8s} ERROR {r['error']}", flush=True)
                    else:
                        print(
                            f"{loss_name:12s} {str(efficient):9s} {impl:8s} {r['time_s'] * 1e3:8.1f}ms "
                            f"{r['peak_extra_mb']:9.1f}MB {r['loss']:11.5f}",
                            flush=True,
                        )
    if args.part in ("cbm", "all"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(
            f"\nCrossBatchMemory(ContrastiveLoss) on {device}: batch {args.batch}, memory {args.memory}, D={args.dim}"
        )
        for impl in ("pml", "fastdml"):
            cfg = dict(
                impl=impl,
                device=device,
                dim=args.dim,
                batch=args.batch,
                memory=args.memory,
                classes=args.classes,
                iters=args.iters,
                threads=max(1, args.threads),
            )
            r = run_cbm(cfg)
            results.append({"part": "cbm", **cfg, **r})
            if "error" in r:
                print(f"{impl:8s} ERROR {r['error']}", flush=True)
            else:
                print(
                    f"{impl:8s} {r['time_s'] * 1e3:8.1f}ms/step {r['peak_extra_mb']:9.1f}MB peak extra "
                    f"loss {r['loss']:.5f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

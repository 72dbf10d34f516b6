"""GPU parity and memory check (run by bench/gpu_check.sh): fastdml on CUDA against PML in float64.

For each fp32 precision (``--precision ieee,tf32x3``) and each loss (contrastive, all triplets, batch-hard
mining + triplet loss; semi-hard has no PML counterpart: tests/test_kernels_cuda.py checks it against the
reference), at each N of ``--sizes`` (D = 128, 10 classes): fastdml's loss and
gradient on CUDA fp32 against pytorch-metric-learning's in float64 on the same (fp32-rounded) inputs.

Tolerances are the parity tests' fp32 ones (rtol 1e-4, atol 1e-5 scaled by the largest |expected|). Loss
values are continuous where a selection flips at a rounding boundary, so they are always compared; the
gradients of the selection loss (batch-hard) jump there, so for them the rows whose gradient
differs may be at most ``--max-flip-rows`` (a fraction of N; a flip moves the gradient of the anchor and of
the two picks, so each flip shows in at most three rows).

Memory: the peak CUDA memory of each fastdml call above the inputs is compared with the prediction of
``fastdml.kernels.memory.predicted_extra_bytes`` (from the real staging budget); a measured peak above
the prediction fails the case. Writes ``parity.json`` and ``parity.md`` to ``--out``; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _losses(mod_l, mod_m):
    """name -> (loss, miner or None, selection) for fastdml's or PML's modules."""
    return {
        "contrastive": (lambda: mod_l.ContrastiveLoss(), None, False),
        "all_triplets": (lambda: mod_l.TripletMarginLoss(margin=0.2), None, False),
        "batch_hard": (lambda: mod_l.TripletMarginLoss(margin=0.2), lambda: mod_m.BatchHardMiner(), True),
    }


def _value_and_grad(make_loss, make_miner, x, y, u):
    x = x.detach().clone().requires_grad_(True)
    loss_fn = make_loss()
    if make_miner is None:
        val = loss_fn(x, y)
    else:
        val = loss_fn(x, y, make_miner()(x, y))
    (g,) = torch.autograd.grad(val * u, [x])
    return val.detach(), g.detach()


OP_OF = {"contrastive": "contrastive", "all_triplets": "triplet", "batch_hard": "row_hardest"}
# PML in float64 holds N x N matrices (all triplets: a list of N K M triplets): the largest N compared
PML_MAX_N = {"contrastive": 4096, "all_triplets": 1024, "batch_hard": 4096}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="ieee,tf32x3")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--max-flip-rows", type=float, default=0.01)
    ap.add_argument("--budget-s", type=float, default=120.0)
    opts = ap.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_parity: no CUDA device")
        return 1
    import pytorch_metric_learning.losses as pml_l
    import pytorch_metric_learning.miners as pml_m
    from fastdml.kernels import memory

    import fastdml
    from fastdml import config

    ours, theirs = _losses(fastdml.losses, fastdml.miners), _losses(pml_l, pml_m)
    t0 = time.time()
    rows, failures = [], []
    for n in (int(v) for v in opts.sizes.split(",")):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 128, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        u = 0.5 + torch.rand((), generator=g).item()
        xc, yc = x.cuda(), y.cuda()
        for name, (mk_loss, mk_miner, selection) in ours.items():
            want = None
            if n <= PML_MAX_N[name]:
                want = _value_and_grad(theirs[name][0], theirs[name][1], xc.double(), yc, u)
            for prec in opts.precision.split(","):
                if time.time() - t0 > opts.budget_s:
                    failures.append(f"budget of {opts.budget_s} s spent before N={n} {name} {prec}")
                    break
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with config.fp32_precision_override(prec):
                    val, grad = _value_and_grad(mk_loss, mk_miner, xc, yc, u)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                pred = memory.predicted_extra_bytes(OP_OF[name], n, n, 128, need_grad=True)
                row = dict(n=n, loss=name, precision=prec, value=float(val), peak_bytes=peak, predicted_bytes=pred)
                ok = True
                if peak > pred:
                    ok = False
                    failures.append(f"N={n} {name} {prec}: peak {peak} B above the prediction {pred} B")
                if want is not None:
                    wv, wg = want
                    scale = max(1.0, float(wv.abs()))
                    row["pml_value"] = float(wv)
                    if abs(float(val) - float(wv)) > 1e-5 * scale + 1e-4 * abs(float(wv)):
                        ok = False
                        failures.append(f"N={n} {name} {prec}: loss {float(val)} vs PML {float(wv)}")
                    gd, wg = grad.double().cpu(), wg.cpu()
                    gscale = max(1.0, float(wg.abs().max()))
                    bad = ((gd - wg).abs() > 1e-5 * gscale + 1e-4 * wg.abs()).any(1)
                    row["grad_rows_off"] = int(bad.sum())
                    allowed = int(opts.max_flip_rows * n) if selection else 0
                    if int(bad.sum()) > allowed:
                        ok = False
                        failures.append(f"N={n} {name} {prec}: {int(bad.sum())} gradient rows off (allowed {allowed})")
                row["ok"] = ok
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(opts.out, "parity.json"), "w") as f:
        json.dump(dict(rows=rows, failures=failures, torch=torch.__version__), f, indent=1)
    with open(os.path.join(opts.out, "parity.md"), "w") as f:
        f.write("| N | loss | precision | value | PML | grad rows off | peak MB | predicted MB | ok |\n")
        f.write("|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(
                f"| {r['n']} | {r['loss']} | {r['precision']} | {r['value']:.6g} | {r.get('pml_value', '-')} | "
                f"{r.get('grad_rows_off', '-')} | {r['peak_bytes'] / 2**20:.1f} | {r['predicted_bytes'] / 2**20:.1f} | "
                f"{'yes' if r['ok'] else 'NO'} |\n"
            )
    for line in failures:
        print("FAIL", line)
    print(f"gpu_parity: {len(rows)} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

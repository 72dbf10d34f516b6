"""``python -m fastdml`` (or ``fastdml``): versions, the path each loss and miner takes here, a self-check.

The report, in order:

1. versions: fastdml, Python, torch, CUDA/ROCm and the driver, Triton, numpy, PML, the CPU and the GPUs;
2. the device table and, for each device checked, the path fastdml takes (dispatch's answer and why, the
   compiled C helpers' status, the fp32 precision setting) and the ``fastdml.ops`` primitives and backend
   functions each loss and miner reaches (:func:`fastdml.selfcheck.trace_paths`);
3. the self-check (:mod:`fastdml.selfcheck`): every loss and miner at a few sizes against the reference
   (float64) and PML (where installed), values and gradients with a random upstream gradient; a pass/fail
   table; exit status 1 on any failure;
4. with ``--bench``, the timing table (:mod:`fastdml.benchmark`): fastdml, PML, the ``torch.mm(x, x.T)``
   forward+backward floor, peak memory.

Fast by default (seconds on a CPU). ``--interpret`` adds the Triton kernels on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported; slow). ``--precision`` lists the
fp32 precisions to check and time on CUDA (``ieee``, ``tf32x3``, ``tf32``); the CPU computes ieee only.
``--json FILE`` writes everything machine-readable, ``--markdown FILE`` the tables.
With ``--device all`` (the default) and a GPU present, the timing table times the GPU only. The JSON and
markdown files are rewritten after each phase and timing row; a SIGINT (a time limit) ends the run with
what was measured, marked ``"interrupted"``.
Exit status: 0 all passed, 1 a check or a fastdml timing case failed (or the run was interrupted), 2 bad
usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

PRECISIONS = ("ieee", "tf32x3", "tf32")
# (n, d) of the self-check per target: tile-crossing sizes; the float64 oracle keeps O(N^3) triplet terms
CHECK_SIZES = {
    "cpu": [(33, 8), (130, 33)],
    "interpret": [(40, 33)],
    "cuda": [(70, 33), (300, 130), (1030, 64)],
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m fastdml",
        description="fastdml on this machine: versions, the path each loss takes, a self-check against the "
        "reference (and PML), optionally a timing table.",
    )
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="where to check (default all)")
    ap.add_argument("--bench", action="store_true", help="also time every loss against PML and the GEMM floor")
    ap.add_argument("--sizes", default="256,1024,4096", help="batch sizes N of the timing table (default %(default)s)")
    ap.add_argument("--precision", default="ieee", help="fp32 precisions on CUDA, comma-separated: ieee,tf32x3,tf32")
    ap.add_argument("--interpret", action="store_true", help="also check the Triton kernels under the interpreter")
    ap.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    ap.add_argument("--cases", default="", help="only the self-check cases whose names contain one of these")
    ap.add_argument("--no-check", action="store_true", help="skip the self-check (versions, paths, timing only)")
    ap.add_argument("--case-s", type=float, default=60.0, help="time guard of one timing case in seconds")
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop starting timing cases after this")
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in _csv(args.sizes)]
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 2:
        ap.error("--sizes needs at least one batch size >= 2")
    args.precision = _csv(args.precision)
    bad = [p for p in args.precision if p not in PRECISIONS]
    if bad or not args.precision:
        ap.error(f"--precision takes a comma-separated list of {PRECISIONS}, got {bad or 'nothing'}")
    args.cases = _csv(args.cases)
    return args


def _ensure_interpreter(from_command_line: bool) -> None:
    """TRITON_INTERPRET=1 must be set before the kernel modules are imported: set it now, or (if they were
    imported already) start this command again with it set."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "fastdml.kernels" in sys.modules or "triton" in sys.modules:
        if not from_command_line:
            raise SystemExit("--interpret: Triton was imported before TRITON_INTERPRET=1; run it as a command")
        os.execv(sys.executable, [sys.executable, "-m", "fastdml", *sys.argv[1:]])


@contextlib.contextmanager
def fp32_precision(name: str):
    """Run the block with fastdml's fp32 precision set to ``name`` (``FASTDML_FP32_PRECISION``); yields
    whether the setting took (False where this fastdml has no such setting)."""
    from fastdml import info

    old = os.environ.get("FASTDML_FP32_PRECISION")
    os.environ["FASTDML_FP32_PRECISION"] = name
    try:
        yield info.fp32_precision() == name
    finally:
        if old is None:
            os.environ.pop("FASTDML_FP32_PRECISION", None)
        else:
            os.environ["FASTDML_FP32_PRECISION"] = old


def _targets(args, devices):
    """(target label, device, backend context, precision, sizes) of each self-check run."""
    import fastdml

    out = []
    for dev in devices:
        if dev == "cpu":
            out.append(("cpu", "cpu", contextlib.nullcontext, "ieee", CHECK_SIZES["cpu"]))
            if args.interpret:
                out.append(
                    (
                        "cpu (triton interpreter)",
                        "cpu",
                        lambda: fastdml.use_backend("triton"),
                        "ieee",
                        CHECK_SIZES["interpret"],
                    )
                )
        else:
            out += [(dev, dev, contextlib.nullcontext, p, CHECK_SIZES["cuda"]) for p in args.precision]
    return out


def _print(*parts) -> None:
    print(*parts, flush=True)


def _summarise_checks(checks) -> list[str]:
    """One line per (target, precision, case): PASS/FAIL, sizes, oracles, worst error ratio."""
    groups: dict = {}
    for c in checks:
        groups.setdefault((c.target, c.precision, c.case), []).append(c)
    lines = [
        "| result | target | precision | case | backend | N | against | worst err / tol |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for (target, prec, case), cs in groups.items():
        ok = all(c.passed for c in cs)
        ratios = [c.worst_ratio for c in cs if c.worst_ratio is not None]
        worst = f"{max(ratios):.3g}" if ratios else "-"
        sizes = ",".join(dict.fromkeys(str(c.n) for c in cs))
        against = ",".join(dict.fromkeys(c.against for c in cs))
        backend = ",".join(dict.fromkeys(c.backend for c in cs if c.backend))
        lines.append(
            f"| {'PASS' if ok else 'FAIL'} | {target} | {prec} | {case} | {backend} | {sizes} | {against} | {worst} |"
        )
    return lines


def _markdown(report: dict) -> str:
    from fastdml import benchmark, info, selfcheck

    v = report["versions"]
    gpus = ", ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in v["gpus"]) or "none"
    out = [
        f"# fastdml {v['fastdml']} self-check: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"- python {v['python']}, torch {v['torch']} (CUDA {v['cuda']}, HIP {v['hip']}, driver {v['driver']}), "
        f"triton {v['triton']}, numpy {v['numpy']}, PML {v['pytorch_metric_learning']}",
        f"- CPU: {v['cpu']} ({v['cpu_count']} cores); GPUs: {gpus}",
        f"- fastdml from {v['fastdml_path']}",
        "",
        "## Devices",
        "",
        info.device_table_markdown(),
        "",
    ]
    for target, p in report["paths"].items():
        out += [
            f"## Paths on {target}",
            "",
            f"dispatch: **{p['backend']}** ({p['why']}); compiled C helpers: {p['native']}; "
            f"fp32 precision: {p['fp32_precision']}",
            "",
            "| case | backend | calls |",
            "| --- | --- | --- |",
        ]
        for row in p["cases"]:
            calls = ", ".join(row["calls"]) if not row["error"] else f"error: {row['error']}"
            out.append(f"| {row['case']} | {row['backend']} | {calls} |")
        out.append("")
    if report["checks"]:
        tol = f"atol {selfcheck.ATOL:g}, rtol {selfcheck.RTOL:g}"
        out += ["## Self-check", "", f"float32 against float64 oracles, {tol}; miners: identical indices.", ""]
        out += _summarise_checks([selfcheck.Check(**c) for c in report["checks"]]) + [""]
    if report["timing"]:
        out += ["## Timing", "", "one step, forward + backward, D = 128, float32; median after a warm-up", ""]
        out += [benchmark.markdown([benchmark.Row(**r) for r in report["timing"]]), ""]
    return "\n".join(out)


def _save(report: dict, args, t_start: float) -> None:
    """Write the JSON and markdown files (after each phase and timing row, so a stopped run leaves them)."""
    report["passed"] = not report["failures"]
    report["seconds"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    if args.markdown:
        with open(args.markdown + ".tmp", "w") as f:
            f.write(_markdown(report) + "\n")
        os.replace(args.markdown + ".tmp", args.markdown)


def _paths(report: dict, targets, cases) -> None:
    from fastdml import info, selfcheck

    for label, dev, ctx, _, _ in targets:
        if label in report["paths"]:
            continue
        with ctx():
            p = info.path_for(dev)
        p["cases"] = selfcheck.trace_paths(dev, ctx, cases)
        report["paths"][label] = p
        _print(f"\n[{label}] path: {p['backend']} ({p['why']}); compiled C helpers: {p['native']}; "
               f"fp32 precision: {p['fp32_precision']}")  # fmt: skip
        for row in p["cases"]:
            calls = ", ".join(row["calls"]) if not row["error"] else f"ERROR {row['error']}"
            _print(f"  {row['case']:38s} {row['backend']:9s} {calls}")


def _checks(report: dict, targets, cases) -> None:
    from fastdml import selfcheck

    _print("\nSelf-check (float32 against float64 oracles; miners: identical indices)")
    for label, dev, ctx, prec, sizes in targets:
        with fp32_precision(prec) as took:
            if not took:
                note = f"{label}: fp32 precision {prec!r} cannot be set in this fastdml: not checked"
                report["notes"].append(note)
                _print("  " + note)
                continue
            checks = selfcheck.run_checks(label, dev, sizes, ctx, prec, cases=cases)
        report["checks"] += [c.to_dict() for c in checks]
        for c in checks:
            if not c.passed:
                report["failures"].append(f"check {label} {prec} {c.case} N={c.n} vs {c.against}: {c.detail}")
    for line in _summarise_checks([selfcheck.Check(**c) for c in report["checks"]]):
        _print(line)


def _timing(report: dict, args, devices, t_start: float) -> None:
    """The timing table: N outermost (so that a time budget cuts the largest sizes, not a precision), then
    each precision. With ``--device all`` and a GPU present only the GPU is timed."""
    from fastdml import benchmark

    if args.device == "all" and len(devices) > 1:
        devices = [d for d in devices if d != "cpu"]
        report["notes"].append("timing: the GPU only (--device cpu times the CPU)")
    _print(f"\nTiming (one step, forward + backward, D = {benchmark.D}, float32) on {', '.join(devices)}")

    def show(row):
        ms, mb = benchmark.fmt_ms(row.ms), benchmark.fmt_mb(row.peak_bytes)
        _print(f"  {row.device} {row.precision} N={row.n:6d} {row.family:12s} {row.impl:8s} {ms:>9s} ms  "
               f"peak {mb:>8s} MB {row.note}")  # fmt: skip
        report["timing"].append(row.to_dict())
        if row.impl == "fastdml" and row.note.startswith(("error", "non-finite", "out of memory")):
            report["failures"].append(f"timing {row.device} {row.precision} {row.family} N={row.n}: {row.note}")
        _save(report, args, t_start)

    for dev in devices:
        for n in args.sizes:
            for prec in args.precision if dev != "cpu" else ["ieee"]:
                with fp32_precision(prec) as took:
                    if not took:
                        note = f"{dev}: fp32 precision {prec!r} cannot be set in this fastdml: not timed"
                        if note not in report["notes"]:
                            report["notes"].append(note)
                        continue
                    spent = time.perf_counter() - t_start
                    benchmark.run_table(
                        dev, [n], precision=prec, case_s=args.case_s, budget_s=max(0.0, args.budget_s - spent),
                        on_row=show,
                    )  # fmt: skip
    _print(benchmark.markdown([benchmark.Row(**r) for r in report["timing"]]))


def main(argv=None) -> int:
    """Run the report; returns the exit status (0 passed, 1 failed, 2 bad usage)."""
    args = parse_args(argv)
    if args.interpret:
        if args.device == "cuda":
            print("--interpret checks the kernels on CPU tensors; it cannot be combined with --device cuda")
            return 2
        _ensure_interpreter(argv is None)

    import torch

    from fastdml import info, selfcheck

    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return 2
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": info.available_devices()}[args.device]
    if args.interpret:
        devices = [d for d in devices if d == "cpu"]  # under the interpreter CUDA launches would be interpreted
    cases = [c for c in selfcheck.CASES if not args.cases or any(s in c.name for s in args.cases)]
    if not cases and not args.no_check:
        print(f"--cases {','.join(args.cases)} matches no case; the cases are: {[c.name for c in selfcheck.CASES]}")
        return 2

    report = {
        "schema": 1,
        "command": ["python", "-m", "fastdml", *(sys.argv[1:] if argv is None else argv)],
        "passed": False,
        "versions": info.versions(),
        "device_table": [
            dict(zip(("device", "when", "path", "fp32_precision", "status"), r)) for r in info.DEVICE_TABLE
        ],
        "paths": {},
        "checks": [],
        "timing": [],
        "failures": [],
        "notes": [],
        "interrupted": False,
    }
    v = report["versions"]
    _print(f"fastdml {v['fastdml']} ({v['fastdml_path']})")
    _print(f"python {v['python']} on {v['platform']}; CPU: {v['cpu']} ({v['cpu_count']} cores)")
    _print(f"torch {v['torch']}  CUDA {v['cuda']}  HIP {v['hip']}  driver {v['driver']}  triton {v['triton']}")
    _print(f"numpy {v['numpy']}  pytorch-metric-learning {v['pytorch_metric_learning']}")
    for g in v["gpus"]:
        _print(f"GPU {g['index']}: {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, capability {g['capability']}")
    _print("\nDevice table (fastdml.dispatch.backend_for):\n" + info.device_table_markdown())

    targets = _targets(args, devices)
    failures = report["failures"]
    try:
        _paths(report, targets, cases)
        _save(report, args, t_start)
        if not args.no_check:
            _checks(report, targets, cases)
            _save(report, args, t_start)
        if args.bench:
            _timing(report, args, devices, t_start)
    except KeyboardInterrupt:  # a time limit's SIGINT: keep what was measured
        report["interrupted"] = True
        failures.append("interrupted (SIGINT) before the end: the report is partial")
    _save(report, args, t_start)
    _print("")
    for line in failures:
        _print("FAILED: " + line)
    _print(f"fastdml self-check {'PASSED' if not failures else 'FAILED'} in {report['seconds']:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

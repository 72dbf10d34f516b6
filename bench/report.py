"""The benchmark report: run the suites, save the JSON, print the ratio tables, draw the chart.

Usage::

    python -m bench.report                    # the full run (N = 256, 1024, 4096; D = 128; fp32)
    python -m bench.report --quick            # small sizes, a minute or two
    python -m bench.report --sizes 256,1024 --families contrastive,semihard --device cpu
    python -m bench.report --no-run           # re-render from the last JSON

What it does:

1. runs ``pytest bench/test_bench_<family>.py bench/test_bench_floor.py bench/test_bench_targets.py`` with
   ``--benchmark-json=bench/out/<device>/bench.json`` (skips and the headline ratios go to
   ``bench.records.json`` beside it);
2. prints, per loss family, each case's median time and peak memory per implementation, the speed-up and
   memory ratio of fastdml against each baseline (``reference``, ``pml``, and on CUDA the forced ``blocked``
   path), and the time against the GEMM floor (``torch.mm(X, X.T)`` forward+backward at the same shape);
   baselines that were not run show their predicted memory;
3. prints the headline ratios (drop-in API against PML, N = 1024, alternating runs) against the goals;
4. draws time and peak memory against N per implementation (log axes, one panel per family) into
   ``bench/out/<device>/bench_<device>.png``.

A full run (no ``--quick``, ``--sizes`` or ``--families``) also publishes: the chart to
``docs/img/bench_<device>.png`` and the tables to the ``<device>`` section of ``bench/RESULTS.md``
(``--no-publish`` keeps both untouched).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict

from bench import _cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "bench", "RESULTS.md")
QUICK_SIZES = (128, 512)


# ------------------------------------------------------------------------------------------------------
# running the suites
# ------------------------------------------------------------------------------------------------------
def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_command(args, device: str, json_path: str, records_path: str) -> list[str]:
    files = [f"bench/test_bench_{f}.py" for f in args.families]
    files.append("bench/test_bench_floor.py")
    if args.targets:
        files.append("bench/test_bench_targets.py")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"]
    cmd += [f"--benchmark-json={json_path}", f"--bench-records={records_path}", f"--bench-device={device}"]
    cmd += ["--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
    cmd += [f"--bench-sizes={','.join(map(str, args.sizes))}"]
    for opt in ("dims", "dtypes", "labels", "modes", "impls"):
        v = getattr(args, opt)
        if v:
            cmd.append(f"--bench-{opt}={v}")
    cmd.append(f"--bench-target-s={args.target_s}")
    if args.no_memory:
        cmd.append("--bench-no-memory")
    if args.budget_s:
        cmd.append(f"--bench-budget-s={args.budget_s}")
    cmd += args.pytest_args
    return cmd


# ------------------------------------------------------------------------------------------------------
# reading the results
# ------------------------------------------------------------------------------------------------------
def load(json_path: str, records_path: str):
    with open(json_path) as f:
        data = json.load(f)
    measured = {}
    floors = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        st = b["stats"]
        if info.get("kind") == "gemm_floor":
            floors[(info["n"], info["d"], info["dtype"], info["device"])] = st["median"]
            continue
        if "family" not in info:
            continue
        case = _cases.Case.from_dict(info)
        measured[case] = {"median": st["median"], "min": st["min"], "rounds": st["rounds"], **info}
    records = {"records": []}
    if os.path.exists(records_path):
        with open(records_path) as f:
            records = json.load(f)
    skipped = {}
    targets = []
    for r in records.get("records", []):
        if r["status"] == "target":
            targets.append(r)
        elif r["status"] in ("skipped", "failed") and "family" in r.get("case", {}):
            skipped[_cases.Case.from_dict(r["case"])] = r
    return data, measured, floors, skipped, targets, records


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# peak-RSS growth below this is within the measurement's noise (Python's own small allocations)
MEM_FLOOR = 100e3


def _mem_ratio(a, b):
    if a is None or b is None:
        return None
    return max(a, MEM_FLOOR) / max(b, MEM_FLOOR)


def _fx(v, digits=3):
    return "-" if v is None else f"{v:.{digits}g}x"


def _baseline_cell(case, measured, skipped):
    """(time text, memory text) of a baseline case: measured, or why not with its prediction."""
    if case in measured:
        m = measured[case]
        return _cases.fmt_seconds(m["median"]), _cases.fmt_bytes(m.get("peak_bytes"))
    if case in skipped:
        r = skipped[case]
        pb = r.get("predicted_bytes")
        reason = r.get("reason", "")
        if "predicted peak" in reason:
            return "not run (memory)", f"~{_cases.fmt_bytes(pb)} predicted"
        if "predicted" in reason and "per call" in reason:
            return f"not run (~{_cases.fmt_seconds(r.get('predicted_s'))} predicted)", f"~{_cases.fmt_bytes(pb)} pred."
        if "memory guard" in reason:
            return "not run (memory guard)", f"> {_cases.fmt_bytes(r.get('measured_bytes'))}"
        if "took" in reason:
            return "not timed (> time limit)", _cases.fmt_bytes(r.get("measured_bytes"))
        if reason.startswith("unavailable"):
            return "unavailable", "-"
        return "skipped", "-"
    return "-", "-"


def family_tables(measured, skipped, floors, device) -> list[str]:
    """Markdown tables, one per family: fastdml against each baseline."""
    keys = defaultdict(dict)
    for c in list(measured) + list(skipped):
        keys[c.replace(impl="fastdml")][c.impl] = c
    baselines = [i for i in _cases.impls_for(device) if i != "fastdml"]
    out = []
    for family in _cases.FAMILIES:
        rows = sorted(
            (k for k in keys if k.family == family),
            key=lambda k: (
                [v.name for v in _cases.VARIANTS[family]].index(k.variant),
                _cases.MODES.index(k.mode) if k.mode in _cases.MODES else 9,
                k.labels,
                k.d,
                k.dtype,
                k.n,
            ),
        )
        if not rows:
            continue
        head = ["call", "mode", "labels", "N", "fastdml", "peak", "x floor"]
        for b in baselines:
            head += [b, "peak", "speed-up", "mem ratio"]
        lines = [f"### {family}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in rows:
            fd = measured.get(k)
            if fd is None and k in skipped:
                t_fd, m_fd = _baseline_cell(k, measured, skipped)
            else:
                t_fd = _cases.fmt_seconds(fd["median"]) if fd else "-"
                m_fd = _cases.fmt_bytes(fd.get("peak_bytes")) if fd else "-"
            floor = floors.get((k.n, k.d, k.dtype, k.device))
            x_floor = _fx(_ratio(fd["median"], floor)) if (fd and floor and k.mode == "fwdbwd") else "-"
            call = k.variant
            cells = [call, k.mode, k.labels, str(k.n), t_fd, m_fd, x_floor]
            for b in baselines:
                bc = k.replace(impl=b)
                if bc not in measured and bc not in skipped:
                    cells += ["n/a" if (b == "pml" and _cases.variant(family, k.variant).native) else "-", "", "", ""]
                    continue
                t_b, m_b = _baseline_cell(bc, measured, skipped)
                bm = measured.get(bc)
                sp = _ratio(bm["median"], fd["median"]) if (bm and fd) else None
                mr = _mem_ratio(bm.get("peak_bytes"), fd.get("peak_bytes")) if (bm and fd) else None
                if mr is None and fd and fd.get("peak_bytes") and bc in skipped and skipped[bc].get("predicted_bytes"):
                    mr_text = f"~{_fx(_mem_ratio(skipped[bc]['predicted_bytes'], fd['peak_bytes']))} (pred.)"
                else:
                    mr_text = _fx(mr)
                cells += [t_b, m_b, _fx(sp), mr_text]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return out


def summary_table(measured, skipped, device) -> str:
    """One line per call and N (forward+backward, 10 random classes): fastdml against each baseline."""
    main = [c for c in measured if c.impl == "fastdml" and c.mode == "fwdbwd" and c.labels == "random10"]
    if not main:
        return ""
    baselines = [b for b in ("pml", "reference", "blocked") if b in _cases.impls_for(device)]
    head = ["call", "N", "fastdml time", "fastdml peak"] + [f"vs {b}: faster / less memory" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def order(c):
        names = [v.name for v in _cases.VARIANTS[c.family]]
        return (_cases.FAMILIES.index(c.family), names.index(c.variant), c.d, c.dtype, c.n)

    for c in sorted(main, key=order):
        fd = measured[c]
        v = _cases.variant(c.family, c.variant)
        cells = [f"`{v.call}`", str(c.n), _cases.fmt_seconds(fd["median"]), _cases.fmt_bytes(fd.get("peak_bytes"))]
        for b in baselines:
            bc = c.replace(impl=b)
            bm = measured.get(bc)
            if bm is not None:
                sp = _ratio(bm["median"], fd["median"])
                mr = _mem_ratio(bm.get("peak_bytes"), fd.get("peak_bytes"))
                cells.append(f"{_fx(sp)} / {_fx(mr)}")
            elif bc in skipped:
                r = skipped[bc]
                pb = r.get("predicted_bytes")
                if "predicted peak" in r.get("reason", ""):
                    cells.append(f"does not fit (~{_cases.fmt_bytes(pb)} predicted)")
                elif "predicted" in r.get("reason", "") or "took" in r.get("reason", ""):
                    cells.append(f"not run (> {_cases.TIME_LIMIT_S:.0f} s per call)")
                else:
                    cells.append("not run")
            else:
                cells.append("n/a" if (b == "pml" and v.native) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets) -> str:
    if not targets:
        return ""
    c0 = targets[0].get("case", {})
    lines = [
        f"| call (N={c0.get('n')}, D={c0.get('d')}, fp32, 10 classes, fwd+bwd, {c0.get('device')}) | fastdml | PML "
        "| speed-up (goal) | fastdml peak | PML peak | less memory (goal) | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        sp, mr = t.get("speedup"), t.get("memory_ratio")
        ok_s = sp is not None and sp >= t["goal_speedup"]
        ok_m = mr is not None and mr >= t["goal_memory"]
        met = "yes" if (ok_s and ok_m) else ("speed only" if ok_s else ("memory only" if ok_m else "no"))
        if mr is None:
            met = ("yes" if ok_s else "no") + " (memory not measured)"
        lines.append(
            f"| `{t['call']}` | {_cases.fmt_seconds(t['fastdml_median_s'])} | {_cases.fmt_seconds(t['pml_median_s'])} "
            f"| **{_fx(sp)}** (>= {t['goal_speedup']:g}x) | {_cases.fmt_bytes(t.get('fastdml_peak_bytes'))} "
            f"| {_cases.fmt_bytes(t.get('pml_peak_bytes'))} | **{_fx(mr)}** (>= {t['goal_memory']:g}x) | {met} |"
        )
    rounds = sorted({t.get("rounds") for t in targets})
    lines.append("")
    lines.append(
        f"Medians of {', '.join(map(str, rounds))} alternating runs per implementation, same process, same inputs."
    )
    return "\n".join(lines)


def floors_table(floors) -> str:
    if not floors:
        return ""
    lines = ["| N | D | dtype | GEMM floor (mm(X, X.T) fwd+bwd) |", "|---|---|---|---|"]
    for (n, d, dt, _dev), t in sorted(floors.items()):
        lines.append(f"| {n} | {d} | {dt} | {_cases.fmt_seconds(t)} |")
    return "\n".join(lines)


def skipped_list(skipped) -> str:
    if not skipped:
        return ""
    lines = []
    for c, r in sorted(skipped.items(), key=lambda kv: kv[0].id):
        lines.append(f"- `{c.id}`: {r.get('reason', r['status'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# the chart
# ------------------------------------------------------------------------------------------------------
IMPL_STYLE = {
    "fastdml": ("tab:green", "o"),
    "blocked": ("tab:olive", "D"),
    "reference": ("tab:blue", "s"),
    "pml": ("tab:red", "^"),
}


def draw_chart(measured, skipped, floors, device, path, title) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    fams = [f for f in _cases.FAMILIES if any(c.family == f for c in list(measured) + list(skipped))]
    if not fams:
        return False
    # the chart shows forward+backward, fp32 (or the first dtype), the first D, 10 random classes when present
    all_cases = list(measured) + list(skipped)
    dtypes = sorted({c.dtype for c in all_cases}, key=lambda d: (d != "float32", d))
    dims = sorted({c.d for c in all_cases}, key=lambda d: (d != 128, d))
    labs = sorted({c.labels for c in all_cases}, key=lambda lab: (lab != "random10", lab))
    dt, d, lab = dtypes[0], dims[0], labs[0]
    fig, axes = plt.subplots(2, len(fams), figsize=(4.2 * len(fams), 7.2), squeeze=False)
    for j, fam in enumerate(fams):
        ax_t, ax_m = axes[0][j], axes[1][j]
        for v in _cases.VARIANTS[fam]:
            ls = "--" if v.native else "-"
            for impl in _cases.impls_for(device):
                pts = sorted(
                    (
                        c
                        for c in all_cases
                        if c.family == fam
                        and c.variant == v.name
                        and c.impl == impl
                        and c.mode == "fwdbwd"
                        and c.dtype == dt
                        and c.d == d
                        and c.labels == lab
                    ),
                    key=lambda c: c.n,
                )
                if not pts:
                    continue
                color, marker = IMPL_STYLE.get(impl, ("k", "x"))
                label = f"{impl}: {v.name}"
                xs = [c.n for c in pts if c in measured]
                ts = [measured[c]["median"] for c in pts if c in measured]
                ms = [measured[c].get("peak_bytes") for c in pts if c in measured]
                if xs:
                    ax_t.plot(xs, ts, ls=ls, marker=marker, color=color, label=label)
                    mx = [x for x, m in zip(xs, ms) if m]
                    if mx:
                        mb = [max(m, MEM_FLOOR) / 1e6 for m in ms if m]
                        ax_m.plot(mx, mb, ls=ls, marker=marker, color=color, label=label)
                # baselines that were not run: hollow markers at their predicted cost
                for c in pts:
                    r = skipped.get(c)
                    if r and r.get("predicted_bytes"):
                        pmb = r["predicted_bytes"] / 1e6
                        ax_m.plot([c.n], [pmb], marker=marker, mfc="none", color=color, ls="none")
                    if r and r.get("predicted_bytes") and "predicted peak" in r.get("reason", ""):
                        ax_m.annotate(
                            "predicted,\nnot run",
                            (c.n, pmb),
                            fontsize=7,
                            textcoords="offset points",
                            xytext=(-38, -4),
                            color=color,
                        )
                    if r and r.get("predicted_s") and "per call" in r.get("reason", ""):
                        ax_t.plot([c.n], [r["predicted_s"]], marker=marker, mfc="none", color=color, ls="none")
        fl = sorted((n, t) for (n, dd, ddt, _), t in floors.items() if dd == d and ddt == dt)
        if fl:
            ax_t.plot([n for n, _ in fl], [t for _, t in fl], ls=":", color="gray", label="GEMM floor")
        ax_t.set_title(f"{fam}")
        sizes = sorted({c.n for c in all_cases if c.family == fam})
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(n) for n in sizes])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("N (batch size)")
        ax_t.set_ylabel("time per call, forward+backward (s)")
        ax_m.set_ylabel("peak memory of one call (MB; floor 0.1)")
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{title}\nD = {d}, {dt}, labels {lab}, forward+backward; hollow: predicted, not run", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------
# publishing
# ------------------------------------------------------------------------------------------------------
RESULTS_HEAD = """# Benchmark results

The latest measured tables of `python -m bench.report` (`make bench`), one section per device. How the
figures are taken: `bench/__init__.py` and `bench/_runner.py` (median of timed rounds with the device
synchronized inside each call; peak memory of one call: CUDA `max_memory_allocated`, CPU peak RSS growth in
a worker process). "x floor": time over the GEMM floor `torch.mm(X, X.T)` forward+backward at the same
shape. "speed-up" and "mem ratio": the baseline's time or peak over fastdml's (higher is better for
fastdml). Baselines that would not fit show their predicted peak instead (not run). Modes: `fwdbwd` is
`loss = f(x, y); loss.backward()`; `fwd` is the loss alone with grad enabled, as in a training step
(fastdml computes its gradient during the forward sweep, so its `fwd` is close to its `fwdbwd`). Labels:
`random10` (10 classes drawn uniformly), `pk4` (N/4 classes of 4 samples, as a P x K sampler gives).
"""


def update_results(section: str, device: str) -> None:
    text = open(RESULTS_MD).read() if os.path.exists(RESULTS_MD) else RESULTS_HEAD
    begin, end = f"<!-- BEGIN {device} -->", f"<!-- END {device} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS_MD, "w") as f:
        f.write(text)


def render(args, device, json_path, records_path, command) -> str:
    data, measured, floors, skipped, targets, records = load(json_path, records_path)
    vers = records.get("versions") or _cases.versions()
    mach = records.get("machine") or _cases.machine(device)
    when = data.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())
    vtext = ", ".join(f"{k} {v}" for k, v in vers.items() if v)
    parts = [
        f"## {device.upper()}: {mach}",
        "",
        f"- date: {when[:19].replace('T', ' ')} UTC",
        f"- machine: {mach}" + (f" (`lscpu`: {_lscpu_model()})" if device == "cpu" else ""),
        f"- versions: {vtext}",
        f"- command: `{command}`",
        "",
    ]
    tt = targets_table(targets)
    if tt:
        parts += ["### Headline: drop-in API against PML (the CPU targets)", "", tt, ""]
    st = summary_table(measured, skipped, device)
    if st:
        parts += ["### Summary: forward+backward, 10 random classes", "", st, ""]
    parts += ["### All cases", "", "Times are medians per call; peak: one call's own peak memory.", ""]
    parts += family_tables(measured, skipped, floors, device)
    ft = floors_table(floors)
    if ft:
        parts += ["", "### GEMM floor", "", ft]
    sl = skipped_list(skipped)
    if sl:
        parts += ["", "### Not run", "", sl]
    failed = [r for r in records.get("records", []) if r["status"] == "failed"]
    if failed:
        parts += ["", "### Failed", ""]
        for r in failed:
            c = r.get("case", {})
            name = _cases.Case.from_dict(c).id if "family" in c else r.get("nodeid", str(c))
            parts.append(f"- `{name}`: {r.get('reason', '')}")
    return "\n".join(parts).replace("\n### ", "\n\n### ").replace("\n\n\n", "\n\n")


def readme_snippet(device, json_path, records_path) -> str:
    """The README's performance section: headline ratios, the summary and the chart."""
    data, measured, floors, skipped, targets, records = load(json_path, records_path)
    mach = records.get("machine") or _cases.machine(device)
    vers = records.get("versions") or {}
    parts = [
        f"Measured on {mach} (torch {vers.get('torch')}, PML {vers.get('pml')}), D = 128, fp32, "
        f"forward+backward, fastdml's drop-in API against PML's identical call (`make bench`; all tables in "
        f"[bench/RESULTS.md](bench/RESULTS.md)).",
        "",
    ]
    tt = targets_table(targets)
    if tt:
        parts += [tt, ""]
    st = summary_table(measured, skipped, device)
    if st:
        parts += [st, ""]
    parts += [f"![time and peak memory against N](docs/img/bench_{device}.png)"]
    return "\n".join(parts)


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small sizes {QUICK_SIZES}, 10 random classes, fwd+bwd")
    ap.add_argument("--sizes", default=None, help="comma-separated N values (default 256,1024,4096)")
    ap.add_argument("--families", default=None, help=f"comma-separated subset of {','.join(_cases.FAMILIES)}")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dims", default=None)
    ap.add_argument("--dtypes", default=None)
    ap.add_argument("--labels", default=None)
    ap.add_argument("--modes", default=None)
    ap.add_argument("--impls", default=None)
    ap.add_argument("--target-s", type=float, default=None, help="about how long each case is timed (s)")
    ap.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="stop starting cases after this many seconds (GPU script)"
    )
    ap.add_argument("--no-targets", dest="targets", action="store_false", help="skip the headline comparison")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/<device>)")
    ap.add_argument("--no-run", action="store_true", help="render the last JSON without running")
    ap.add_argument(
        "--json",
        default=None,
        help="with --no-run: render this benchmark JSON (its .records.json beside it), e.g. one fetched from a GPU",
    )
    ap.add_argument("--no-publish", action="store_true", help="never touch docs/img and bench/RESULTS.md")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)

    full = not (args.quick or args.sizes or args.families)
    device = _device(args.device)
    if args.families:
        args.families = [f.strip() for f in args.families.split(",") if f.strip()]
        bad = [f for f in args.families if f not in _cases.FAMILIES]
        if bad:
            ap.error(f"--families: unknown {bad}; choose from {list(_cases.FAMILIES)}")
    else:
        args.families = list(_cases.FAMILIES)
    if args.sizes:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    elif args.quick:
        args.sizes = list(QUICK_SIZES)
    else:
        args.sizes = [256, 1024, 4096]
    if args.quick:
        args.labels = args.labels or "random10"
        args.modes = args.modes or "fwdbwd"
        args.targets = False
    if args.target_s is None:
        args.target_s = 0.5 if args.quick else 2.0
    if set(args.families) != set(_cases.FAMILIES):
        args.targets = False

    out = args.out or os.path.join(ROOT, "bench", "out", device)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "bench.json")
    if args.json:
        if not args.no_run:
            ap.error("--json needs --no-run")
        json_path = args.json
    records_path = os.path.splitext(json_path)[0] + ".records.json"
    meta_path = os.path.splitext(json_path)[0] + ".meta.json"
    command = "python -m bench.report" + (
        "" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    rc = 0
    if not args.no_run:
        with open(meta_path, "w") as f:
            json.dump({"command": command, "device": device}, f)
        cmd = pytest_command(args, device, json_path, records_path)
        print("+", shlex.join(cmd), flush=True)
        env = dict(os.environ)
        if args.threads:
            # the suites and the memory worker both read these (torch sizes its pools from OMP_NUM_THREADS)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if not os.path.exists(json_path):
            print("no benchmark JSON was written", file=sys.stderr)
            return rc or 1
    elif os.path.exists(meta_path):
        # re-rendering (say, a JSON fetched from a GPU machine): show the command that measured it
        with open(meta_path) as f:
            meta = json.load(f)
        command, device = meta.get("command", command), meta.get("device", device)
        full = full or bool(args.json)
    text = render(args, device, json_path, records_path, command)
    png = os.path.join(out, f"bench_{device}.png")
    _, measured, floors, skipped, _, recs = load(json_path, records_path)
    vers = recs.get("versions") or {}
    title = (
        f"fastdml {vers.get('fastdml', '')} vs PML {vers.get('pml', '')}, torch {vers.get('torch', '')}: "
        f"{recs.get('machine') or _cases.machine(device)}"
    )
    drew = draw_chart(measured, skipped, floors, device, png, title)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "readme_snippet.md"), "w") as f:
        f.write(readme_snippet(device, json_path, records_path) + "\n")
    print()
    print(text)
    print()
    print(f"JSON: {json_path}\nrecords: {records_path}\nreport: {os.path.join(out, 'report.md')}")
    if drew:
        print(f"chart: {png}")
    failed = [r for r in recs.get("records", []) if r["status"] == "failed"]
    if rc not in (0, 1) or (rc == 1 and not failed):
        print(f"pytest exited with {rc}: nothing published", file=sys.stderr)
    elif full and not args.no_publish:
        if failed:
            print(f"{len(failed)} case(s) failed (listed in the report); publishing the rest", file=sys.stderr)
        if drew:
            img = os.path.join(ROOT, "docs", "img", f"bench_{device}.png")
            os.makedirs(os.path.dirname(img), exist_ok=True)
            with open(png, "rb") as src, open(img, "wb") as dst:
                dst.write(src.read())
            print(f"published chart: {img}")
        update_results(text.replace(f"bench_{device}.png", f"bench_{device}.png"), device)
        print(f"published tables: {RESULTS_MD}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

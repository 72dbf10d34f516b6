"""Compile every Triton kernel variant for a Hopper GPU (sm_90) on a machine without one, and report it.

The interpreter (the CPU tests) ignores layouts, register limits and several type rules of the real
compiler; this script catches those errors before GPU time is spent. It calls each public launcher on small
CPU tensors with the GPU configs, but instead of launching, each kernel is compiled ahead of time with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (ptxas ships with Triton), for every fp32 precision
(``ieee`` is the default setting; ``tf32x3`` and ``tf32`` are what ``fastdml.config`` can select).

One record per compiled variant goes to ``bench/out/compile_report.json`` (``--out``): ``kernel``,
``dtype``, ``precision``, ``default`` (a config the API launches without an explicit precision setting),
``sweep`` (the kernel's work grows with N x M), ``registers`` and ``spill_bytes`` (REG and STACK + LOCAL of
the cubin Triton built, by cuobjdump; ``local_stores``: STL instructions in its SASS),
``dot_ops`` (``tt.dot`` in the TTIR), ``mma_instructions`` (mma / wgmma in the PTX), ``ctas_n4096`` and
``ctas_n65536`` (grid size of the default launch, square fp32 l2 at D = 128, the smallest over the
launches of one call), ``triton_version``, and the constexprs that tell variants apart. Exits non-zero when
a variant fails to compile, a default variant spills, a default sweep launches fewer than 264 CTAs at
N = 4096, or an fp32 kernel with a ``tl.dot`` has no spill-free tf32x3 variant with tensor-core
instructions. Usage:

    TRITON_INTERPRET=0 python -m bench.compile_check [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from fastdml.kernels import _common  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastdml  # noqa: E402,F401  (aliases kernels/ as fastdml.kernels)
from fastdml import config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MIN_CTAS = 264  # two per multiprocessor of an H100
_DT = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.bool: "i1",
}
_SHOWN = (
    "KIND",
    "BM",
    "BN",
    "BK",
    "BG",
    "BP",
    "BT",
    "NEED_GRAD",
    "COLMODE",
    "STATS",
    "SMOOTH",
    "ONE_BLOCK",
    "TRI",
    "ONE_GROUP",
)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class State:
    mode = "compile"  # or "grid": record grid sizes, compile nothing
    dtype = "fp32"
    records: dict = {}
    failures: list = []
    grids: dict = {}  # kernel name -> smallest grid size of the current call
    partial: str | None = None  # where records so far are dumped every 10 variants
    candidate_sets: set = set()  # (dtype, precision, D) of the row sweeps' compiled candidate lists


def _grid_size(grid) -> int:
    n = 1
    for g in grid if isinstance(grid, (tuple, list)) else (grid,):
        n *= int(g)
    return n


def _signature(fn, args, kwargs):
    """The compile-time signature, constexprs and attributes that the launcher's call would give, like the
    runtime's specialization: 16-byte aligned pointers, a specialized int equal to 1 becomes a constant,
    a specialized multiple of 16 carries ``tt.divisibility``."""
    sig, const, attrs = {}, {}, {}
    vals = dict(zip(fn.arg_names, args))
    vals.update(kwargs)
    for i, name in enumerate(fn.arg_names):
        v = vals[name]
        param = fn.params[i]
        if param.is_constexpr:
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if not param.do_not_specialize and v == 1:
                sig[name] = "constexpr"
                const[name] = 1
                continue
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if not param.do_not_specialize and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, const, attrs


def _cubin_usage(cubin: bytes) -> tuple[int | None, int | None, int | None]:
    """(registers, local-memory bytes per thread, local stores in the SASS) of the cubin Triton built, read
    with the cuobjdump that ships with Triton. Spills live in local memory: STACK + LOCAL > 0 or STL."""
    tool = os.path.join(_BIN, "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=120)
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, timeout=300)
    txt = usage.stdout
    reg = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    local = re.search(r"LOCAL:(\d+)", txt)
    spill = int(stack.group(1)) + int(local.group(1)) if stack and local else None
    stl = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass.stdout)) if sass.returncode == 0 else None
    return (int(reg.group(1)) if reg else None), spill, stl


def _compile(fn, grid, args, kwargs):
    name = fn.__name__
    if State.mode == "grid":  # record the grid, and compile too: the launch plans at large N (BP, BT) differ
        State.grids[name] = min(State.grids.get(name, 1 << 62), _grid_size(grid))
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    sig, const, attrs = _signature(fn, args, kwargs)
    key = (
        name,
        tuple(sorted((k, str(v)) for k, v in sig.items())),
        tuple(sorted((k, str(v)) for k, v in const.items())),
        tuple(sorted(attrs)),
        tuple(sorted(opts.items())),
    )
    if key in State.records:
        return
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=TARGET, options=opts)
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    regs, spill, stl = _cubin_usage(k.asm["cubin"])
    prec = str(const.get("PREC", "none"))
    rec = dict(
        kernel=name,
        dtype=State.dtype,
        precision=prec,
        default=prec in ("ieee", "none"),
        sweep=True,  # every kernel here loops over all N x M pairs (or a chunk's rows x M)
        registers=regs,
        spill_bytes=spill,
        local_stores=stl,
        dot_ops=len(re.findall(r"\btt\.dot\b", k.asm.get("ttir", ""))),
        mma_instructions=len(re.findall(r"^\s*(?:@\S+\s+)?(?:mma|wgmma)\.", ptx, flags=re.M)),
        ctas_n4096=None,
        ctas_n65536=None,
        triton_version=triton.__version__,
        shared_bytes=getattr(md, "shared", None),
        global_scratch=getattr(md, "global_scratch_size", 0) or 0,
        constexprs={c: const[c] for c in _SHOWN if c in const} | dict(opts),
        compile_s=round(time.time() - t, 2),
    )
    State.records[key] = rec
    if State.partial and len(State.records) % 10 == 0:  # a run cut short still leaves its records
        with open(State.partial, "w") as f:
            json.dump(dict(partial=True, triton_version=triton.__version__, records=list(State.records.values())), f)
    print(
        f"  {name:24s} {State.dtype} {prec:6s} regs={regs} spill={spill} dots={rec['dot_ops']} "
        f"mma={rec['mma_instructions']} {rec['constexprs']} {rec['compile_s']}s",
        flush=True,
    )


class _Launcher:
    def __init__(self, fn, grid):
        self.fn, self.grid = fn, grid

    def __call__(self, *args, **kwargs):
        _compile(self.fn, self.grid, args, dict(kwargs))


JITFunction.__getitem__ = lambda self, grid: _Launcher(self, grid)
_common._cpu_ok = lambda: True


def _calls(K, x, y, r, z, kind):
    """(name, thunk) for every launcher on these inputs."""
    inf = float("inf")
    n = x.shape[0]
    return [
        ("contrastive", lambda: K.contrastive_stats_fwd(x, y, r, z, None, kind, 0.1, 1.0, -inf, inf, 0.0, inf, True)),
        (
            "contrastive-nograd",
            lambda: K.contrastive_stats_fwd(x, y, r, z, None, kind, 0.1, 1.0, -inf, inf, 0.0, inf, False),
        ),
        (  # the row-owned full square of torch.use_deterministic_algorithms(True)
            "contrastive-det",
            lambda: K.contrastive_stats_fwd(
                x, y, r, z, None, kind, 0.1, 1.0, -inf, inf, 0.0, inf, True, deterministic=True
            ),
        ),
        ("triplet", lambda: K.triplet_stats_fwd(x, y, r, z, None, kind, 0.1, False, -inf, inf, 0.0, inf, True)),
        ("triplet-smooth", lambda: K.triplet_stats_fwd(x, y, r, z, None, kind, 0.1, True, -inf, inf, 0.0, inf, False)),
        ("semihard", lambda: K.semihard_stats_fwd(x, y, r, z, None, kind, 0.1, True)),
        ("row_extreme", lambda: K.row_extreme(x, y, r, z, None, kind, "pos", "max", -inf, inf, None, "")),
        (
            "row_extreme-thr",
            lambda: K.row_extreme(x, y, r, z, None, kind, "neg", "min", -inf, inf, torch.zeros(n), "gt"),
        ),
        ("pair_list", lambda: K.pair_list(x, y, r, z, None, kind, -inf, inf)),
        ("triplet_list", lambda: K.triplet_list(x, y, r, z, None, kind, -inf, inf)),
        ("row_hardest", lambda: K.row_hardest(x, y, r, z, None, kind)),
    ]


# the autotuned row sweeps: every D bucket's candidates (D = 3, 64, 128, 130 and 256 cover the buckets the
# candidate sets tell apart, aligned and unaligned rows); the other launchers' configs follow D less
_ROW_SWEEPS = ("row_extreme", "row_hardest")
_ROW_DIMS = (3, 64, 128, 130, 256)


def _run(call, what):
    """Run one launcher call; the autotuned row sweeps once per candidate config (all are default)."""
    if what.split()[0].startswith(_ROW_SWEEPS):
        most = max(len(_common.extreme_configs(d, t, c)) for d in _ROW_DIMS for t in _DT for c in _common.PRECISIONS)
        for i in range(most):  # FORCE_CANDIDATE past a shorter list repeats its last (compiled once)
            _common.FORCE_CANDIDATE[:] = [i]
            try:
                _run_one(call, f"{what} candidate {i}")
            finally:
                _common.FORCE_CANDIDATE.clear()
        return
    _run_one(call, what)


def _run_one(call, what):
    try:
        call()
    except Exception as exc:  # keep going: report every failing kernel
        # after a "launch" the launchers read their (unwritten) outputs back: harmless errors here
        if "compil" in type(exc).__name__.lower() or "triton" in repr(type(exc)).lower():
            State.failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:400]}")
            print(f"FAIL {what}: {exc}", flush=True)
        elif not isinstance(exc, (RuntimeError, ValueError)):
            State.failures.append(f"{what}: {type(exc).__name__}: {exc}")
            print(f"FAIL {what}: {type(exc).__name__}: {exc}", flush=True)


def _grids(K, n):
    """Smallest grid size per kernel of the default launches, square fp32 l2 at D = 128, N = n (the variants
    these launches pick are compiled too)."""
    State.mode = "grid"
    State.dtype = "fp32"
    State.grids = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 128, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    for name, call in _calls(K, x, y, None, None, "l2"):
        _run(call, f"{name} grid N={n}")
    State.mode = "compile"
    return dict(State.grids)


def main() -> int:
    from fastdml import kernels as K

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "compile_report.json"))
    ap.add_argument("--quick", action="store_true", help="fp32 only, D = 128 (a smoke run)")
    opts = ap.parse_args()
    State.partial = opts.out + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    t0 = time.time()
    dtypes = [torch.float32] if opts.quick else [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        State.dtype = _DT[dtype]
        precs = ("ieee", "tf32x3", "tf32") if dtype == torch.float32 else ("ieee",)
        for prec in precs:
            main_set = dtype == torch.float32 and prec == "ieee"
            # every kind in fp32 (ieee, tf32x3); l2 and dot for fp16/bf16 (sql2 differs from l2 by one sqrt);
            # tf32 on l2 (its code shape; tf32x3 is the precision that must be clean)
            kinds = ("l2", "sql2", "dot") if (dtype == torch.float32 and prec != "tf32") else ("l2", "dot")
            if prec == "tf32":
                kinds = ("l2",)
            with config.fp32_precision_override(prec):
                for kind in kinds:
                    for rect in (False, True):
                        # D = 128 for every launcher; D = 3, 64, 130 (other D groups, no divisibility) for the
                        # two launchers whose constexprs follow D, in the default set; every D bucket's
                        # autotune candidates of the row sweeps, in every dtype and precision
                        dims = (3, 64, 128, 130) if main_set and not opts.quick else (128,)
                        for d in sorted(set(dims) | (set() if opts.quick else set(_ROW_DIMS))):
                            x = torch.randn(40, d).to(dtype)
                            y = torch.randint(0, 3, (40,))
                            r = torch.randn(30, d).to(dtype) if rect else None
                            z = torch.randint(0, 3, (30,)) if rect else None
                            for name, call in _calls(K, x, y, r, z, kind):
                                row_sweep = name.startswith(_ROW_SWEEPS)
                                if d not in dims and not row_sweep:
                                    continue
                                if (
                                    d != 128
                                    and not row_sweep
                                    and name not in ("contrastive", "contrastive-det", "triplet")
                                ):
                                    continue
                                _run(call, f"{name} {State.dtype} {prec} {kind} rect={rect} d={d}")
                                if row_sweep:
                                    State.candidate_sets.add((State.dtype, prec, d))
    g4096 = _grids(K, 4096)
    g65536 = _grids(K, 65536)
    records = list(State.records.values())
    for rec in records:
        rec["ctas_n4096"] = g4096.get(rec["kernel"])
        rec["ctas_n65536"] = g65536.get(rec["kernel"])
    problems = list(State.failures)
    for rec in records:
        tag = f"{rec['kernel']} {rec['dtype']} {rec['precision']} {rec['constexprs']}"
        if rec["default"] and (rec["spill_bytes"] is None or rec["spill_bytes"] > 0 or rec["local_stores"]):
            problems.append(f"default variant spills ({rec['spill_bytes']} B): {tag}")
        if rec["global_scratch"]:
            problems.append(f"needs global scratch ({rec['global_scratch']} B; no allocator is set): {tag}")
        if rec["default"] and rec["sweep"] and (rec["ctas_n4096"] or 0) < MIN_CTAS:
            problems.append(f"default sweep launches {rec['ctas_n4096']} < {MIN_CTAS} CTAs at N = 4096: {tag}")
    # every autotune candidate of the row sweeps, per D bucket, dtype and precision compiled, is a record
    for dt_name, prec, d in sorted(State.candidate_sets):
        dtype = next(t for t, n in _DT.items() if n == dt_name)
        for cand in _common.extreme_configs(d, dtype, prec):
            for kernel in ("row_extreme_kernel", "row_hardest_kernel"):
                if not any(
                    r["kernel"] == kernel
                    and r["dtype"] == dt_name
                    and r["precision"] == prec
                    and all(r["constexprs"].get(k) == cand.get(k) for k in ("BM", "BN", "BK", "num_warps", "maxnreg"))
                    for r in records
                ):
                    problems.append(f"no record of candidate {cand}: {kernel} {dt_name} {prec} D = {d}")
    for kernel in sorted({r["kernel"] for r in records if r["dtype"] == "fp32" and r["dot_ops"] > 0}):
        good = [
            r
            for r in records
            if r["kernel"] == kernel
            and r["dtype"] == "fp32"
            and r["precision"] == "tf32x3"
            and r["mma_instructions"] > 0
            and r["spill_bytes"] == 0
            and not r["local_stores"]
        ]
        if not good:
            problems.append(f"{kernel}: no spill-free fp32 tf32x3 variant with mma instructions")
    report = dict(
        triton_version=triton.__version__,
        torch_version=torch.__version__,
        target="sm_90",
        min_ctas=MIN_CTAS,
        seconds=round(time.time() - t0, 1),
        problems=problems,
        records=records,
    )
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    for line in problems:
        print("PROBLEM", line)
    print(f"{len(records)} variants compiled with Triton {triton.__version__}, {len(problems)} problems -> {opts.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

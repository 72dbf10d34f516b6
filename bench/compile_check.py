"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter (the CPU tests) ignores layouts, register limits and several type rules of the real
compiler; this script catches those errors before GPU time is spent. It calls each public launcher on small
CPU tensors with the GPU configs, but instead of launching, each kernel is compiled ahead of time with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (ptxas ships with Triton). Usage:

    TRITON_INTERPRET=0 python -m bench.compile_check [fp32] [fp16] [bf16]     (default: all three)
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from fastdml.kernels import _common  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastdml  # noqa: E402,F401  (aliases kernels/ as fastdml.kernels)

TARGET = GPUTarget("cuda", 90, 32)
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
seen: dict = {}
scratch_kernels: list = []


def _compile(fn, args, kwargs):
    """Compile ``fn`` for TARGET as the GPU runtime would for these arguments.

    Like the launcher's specialization: tensor pointers are 16-byte aligned (``tt.divisibility``), an int
    argument that the kernel specializes (not in ``do_not_specialize``) becomes a constant when it is 1 and
    carries ``tt.divisibility`` when it is a multiple of 16 (e.g. D = 64), otherwise it is i32 / i64.
    """
    sig, const, attrs = {}, {}, {}
    names = fn.arg_names
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    vals = dict(zip(names, args))
    vals.update(kwargs)
    for i, name in enumerate(names):
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
    key = (
        fn.__name__,
        tuple(sorted((k, str(v)) for k, v in sig.items())),
        tuple(sorted((k, str(v)) for k, v in const.items())),
        tuple(sorted(attrs)),
        tuple(sorted(opts.items())),
    )
    if key in seen:
        return
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=TARGET, options=opts)
    md = k.metadata
    seen[key] = (time.time() - t, getattr(md, "shared", None), getattr(md, "num_warps", None))
    shown = {k: v for k, v in const.items() if k in ("KIND", "BM", "BN", "BG", "NEED_GRAD", "COLMODE", "D")}
    # a kernel that needs global scratch memory fails at launch unless triton.set_allocator was called
    scratch = getattr(md, "global_scratch_size", 0) or 0
    if scratch:
        scratch_kernels.append(f"{fn.__name__} {shown}: {scratch} B")
    print(
        f"  ok {fn.__name__:28s} {time.time() - t:5.1f}s smem={getattr(md, 'shared', '?')} {_usage(k)} "
        f"warps={opts.get('num_warps', '?')} {shown}",
        flush=True,
    )


def _usage(k) -> str:
    """Registers / spill stores of the cubin, read with the cuobjdump that ships with Triton."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = k.asm.get("cubin") if hasattr(k, "asm") else None
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            txt = subprocess.run(
                [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
            ).stdout
        except Exception:
            return ""
    reg = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return f"regs={reg.group(1) if reg else '?'} stack={stack.group(1) if stack else '?'}"


class _Launcher:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        _compile(self.fn, args, dict(kwargs))


JITFunction.__getitem__ = lambda self, grid: _Launcher(self)
_common._cpu_ok = lambda: True


def _calls(K, x, y, r, z, kind):
    """(name, thunk) for every launcher on these inputs."""
    inf = float("inf")
    return [
        ("contrastive", lambda: K.contrastive_stats_fwd(x, y, r, z, None, kind, 0.1, 1.0, -inf, inf, 0.0, inf, True)),
        (
            "contrastive-nograd",
            lambda: K.contrastive_stats_fwd(x, y, r, z, None, kind, 0.1, 1.0, -inf, inf, 0.0, inf, False),
        ),
        ("triplet", lambda: K.triplet_stats_fwd(x, y, r, z, None, kind, 0.1, False, -inf, inf, 0.0, inf, True)),
        ("triplet-smooth", lambda: K.triplet_stats_fwd(x, y, r, z, None, kind, 0.1, True, -inf, inf, 0.0, inf, False)),
        ("semihard", lambda: K.semihard_stats_fwd(x, y, r, z, None, kind, 0.1, True)),
        ("row_extreme", lambda: K.row_extreme(x, y, r, z, None, kind, "pos", "max", -inf, inf, None, "")),
        (
            "row_extreme-thr",
            lambda: K.row_extreme(x, y, r, z, None, kind, "neg", "min", -inf, inf, torch.zeros(40), "gt"),
        ),
        ("pair_list", lambda: K.pair_list(x, y, r, z, None, kind, -inf, inf)),
        ("triplet_list", lambda: K.triplet_list(x, y, r, z, None, kind, -inf, inf)),
    ] + ([("row_hardest", lambda: K.row_hardest(x, y, r, z, None, kind))] if hasattr(K, "row_hardest") else [])


def main() -> int:
    from fastdml import kernels as K

    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtypes = [names[a] for a in sys.argv[1:] if a in names] or list(names.values())
    fails = 0
    for dtype in dtypes:
        for kind in ("l2", "sql2", "dot"):
            for rect in (False, True):
                for d in (1, 3, 64, 130):
                    x = torch.randn(40, d).to(dtype)
                    y = torch.randint(0, 3, (40,))
                    r = torch.randn(30, d).to(dtype) if rect else None
                    z = torch.randint(0, 3, (30,)) if rect else None
                    calls = _calls(K, x, y, r, z, kind)
                    for name, call in calls:
                        if d != 64 and name not in ("contrastive", "triplet"):
                            continue
                        try:
                            call()
                        except Exception as exc:  # keep going: report every failing kernel
                            # the launchers read outputs back (.tolist()) after "launching": harmless here
                            if "compile" in type(exc).__name__.lower() or "triton" in repr(type(exc)):
                                fails += 1
                                print(f"FAIL {name} {dtype} {kind} rect={rect} d={d}: {exc}", flush=True)
                            elif not isinstance(exc, (RuntimeError, ValueError)):
                                fails += 1
                                print(f"FAIL {name} {dtype} {kind} rect={rect} d={d}: {type(exc).__name__}: {exc}")
    for line in scratch_kernels:
        fails += 1
        print(f"FAIL needs global scratch (no allocator is set): {line}")
    print(f"{len(seen)} kernel variants compiled, {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiled helpers for the blocked CPU path's batch-hard step: the row scans (mining) and the chosen-triplet
loss.

Why: each replaces a chain of small eager ops whose cost is dispatch and extra passes, not arithmetic (or, for
the strips, lets the GEMM shrink).

* ``row_hardest_scan`` (``csrc/row_scan.c``): finding each anchor's farthest positive and nearest negative in
  a (b, M) score block takes about a dozen ATen ops per block in torch (gather the positives, ``max`` with
  its index, fill them with +inf, chunked ``amin``, ``min`` with its index, ...), and ``torch.max/min`` along
  a dimension are scalar loops on the CPU; the C scan is one vectorized pass.
* ``row_hardest_strip`` (same file): the square case from the upper triangle only, each entry
  ``x_a . x_c`` read once for anchor a and once for anchor c, so the GEMM shrinks to the strips
  ``x[s:e] x[s:]^T``; the column direction needs running extremes per anchor across strips, which in torch
  ops would cost more than the GEMM saves (a column ``min`` with its index is a strided scalar loop).
* ``chosen_triplets`` (``csrc/chosen_triplets.c``): the loss of one triplet per anchor and its gradient (two
  row gathers, differences, norms, the coefficients, the gradient rows and two ``index_add_``: about 35 ops)
  in one pass over the anchors and one over the chosen rows.

* ``contrastive_tile`` (``csrc/contrastive_tile.c``): the elementwise part of one tile of the square
  contrastive sweep (masks, terms, sums, counts, near-duplicates, the pair weights for the GEMMs) in one pass
  instead of about thirty ATen ops per tile, taking only the entries above the diagonal.

Both scans stay: the strip scan serves the square case, the row scan the rest (a memory queue, excluded
columns), and the strips are measured to matter (``bench/bench_native.py``; figures in ``bench/RESULTS.md``).

How: the C sources ship with the package; ``csrc/fastdml_native.h`` holds every entry point's prototype, the
sources include it and :func:`_prototypes` derives the ctypes argument types from it. They are compiled on
first use with the system C compiler (``$CC`` split as a shell would, else ``cc``; ``-O3 -march=native``) into
a cache directory (``FASTDML_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastdml``, else ``~/.cache/fastdml``), one
library file per set of sources, flags, compiler and CPU, so a machine builds it once and later processes only
load it. A new build is first loaded in a child process (a crash there cannot take the caller down), then its
size and SHA-256 are recorded beside it; a cached file is loaded only when it matches that record, else it is
rebuilt. A failed build is recorded too, and no process retries it for an hour. Every entry point checks the
offsets and sizes it is given. They are called through ``ctypes`` (which releases the GIL for the call);
single-threaded, so results are the same run to run. Without a compiler, when the build fails, or with
``FASTDML_NATIVE=0`` in the environment, the functions here decline (``False`` / ``None``) and the callers run
their torch ops instead: the same picks and values within rounding (``tests/test_blocked_native.py``), only
slower. :func:`status` says which, and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
_HEADER = _CSRC / "fastdml_native.h"  # the prototypes: the C includes them, _prototypes() reads them
_SOURCES = [_CSRC / name for name in ("row_scan.c", "chosen_triplets.c", "contrastive_tile.c")]
_VERSION = 5  # fastdml_row_scan_version() of the C sources this module calls
# -march=native is not known to every compiler; -fopenmp-simd only enables the sources' `omp simd` loops;
# -fno-math-errno lets sqrt vectorize (the sources never read errno)
_FLAG_SETS = (
    ("-O3", "-fno-math-errno", "-march=native", "-fopenmp-simd"),
    ("-O3", "-fno-math-errno", "-fopenmp-simd"),
    ("-O3",),
)
_RETRY_FAILED_BUILD_S = 3600.0  # a failed build is not retried by any process for this long
_BAD_ARGUMENT = -1  # FASTDML_BAD_ARGUMENT in the header
_NO_MEMORY = -2  # FASTDML_NO_MEMORY

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": the reason when None, "note": a rebuild's reason
_local = threading.local()  # .disabled: the `disabled()` context manager's stack, per thread


def _prototypes() -> dict[str, list]:
    """Each entry point's ctypes argument types, from the header's one-line prototypes (any pointer: void *)."""
    scalars = {"int64_t": ctypes.c_int64, "double": ctypes.c_double}
    table = {}
    for name, args in re.findall(r"^int64_t (\w+)\((.*)\);$", _HEADER.read_text(), re.M):
        parts = [] if args == "void" else [a.strip() for a in args.split(",")]
        table[name] = [ctypes.c_void_p if "*" in a else scalars[a.rsplit(" ", 1)[0]] for a in parts]
    return table


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("FASTDML_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "fastdml")
    return Path(root) / "native"


def _compiler() -> tuple[list[str] | None, str]:
    """``$CC`` (else ``cc``) split as a shell would (``CC="gcc -O0"``): ``(argv, "")`` or ``(None, why)``."""
    raw = os.environ.get("CC") or "cc"
    try:
        cc = shlex.split(raw)
    except ValueError as exc:
        return None, f"CC={raw!r} cannot be split into words: {exc}"
    if not cc or shutil.which(cc[0]) is None:
        return None, f"no C compiler: {cc[0] if cc else raw!r} is not on PATH (set CC to one)"
    return cc, ""


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _digest(path: Path) -> str:
    """``"<size> <sha256>"`` of a file: written beside each built library, checked before it is loaded."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _verify(target: Path) -> str:
    """Why the cached library ``target`` must not be loaded ("" when its size and digest match the record)."""
    record = target.with_name(target.name + ".sha256")
    try:
        want = record.read_text().strip()
        size = target.stat().st_size
    except OSError as exc:
        return f"no digest record ({exc.strerror})"
    if want.split(" ")[0] != str(size):
        return f"{target.name} has {size} bytes, its record says {want.split(' ')[0]}"
    if _digest(target) != want:
        return f"{target.name}'s digest differs from its record"
    return ""


_PROBE = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "for name in sys.argv[3:]: getattr(lib, name)\n"
    "lib.fastdml_row_scan_version.restype = ctypes.c_int64\n"
    "sys.exit(0 if lib.fastdml_row_scan_version() == int(sys.argv[2]) else 3)\n"
)


def _probe(path: str) -> str:
    """Load a freshly built library in a child process (a crash there cannot take this one down): "" or why."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, path, str(_VERSION), *_prototypes()],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probing the built library failed: {exc}"
    if done.returncode != 0:
        return f"the built library fails to load (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return ""


def _failed_before(marker: Path) -> str:
    """The reason a recent build recorded in ``marker`` failed, or "" (none, or older than the retry time)."""
    try:
        if time.time() - marker.stat().st_mtime < _RETRY_FAILED_BUILD_S:
            return marker.read_text().strip() or "unknown"
    except OSError:
        pass
    return ""


def _remember_failure(marker: Path, why: str) -> None:
    with contextlib.suppress(OSError):  # a full disk cannot keep the record either; this process still does
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(why + "\n")


def _compile(cc: list[str], flags: tuple, target: Path) -> tuple[str, bool]:
    """Build ``target``, probe it, record its digest: ``("", _)`` or ``(why, whether the flags are the cause)``."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # build under a unique name, then rename: processes building at once never load a partial file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        # CC's own words come after ours, so that CC="gcc -O0" wins over -O3
        cmd = [cc[0], *flags, *cc[1:], "-std=c11", "-shared", "-fPIC", "-o", tmp, *map(str, _SOURCES)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            err = done.stderr.strip()
            dropped = {f.lstrip("-").split("=")[0] for f in flags[1:]}
            return f"{' '.join(cmd)} failed: {err[-500:]}", any(f in err for f in dropped)
        why = _probe(tmp)
        if why:
            return why, False
        Path(tmp + ".sha256").write_text(_digest(Path(tmp)) + "\n")
        os.replace(tmp, target)
        os.replace(tmp + ".sha256", target.with_name(target.name + ".sha256"))
        tmp = None
        return "", False
    except (OSError, subprocess.SubprocessError) as exc:
        return f"building {target} failed: {exc}", False
    finally:
        if tmp is not None:
            for leftover in (tmp, tmp + ".sha256"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def _load(target: Path) -> tuple[ctypes.CDLL | None, str]:
    """Load a verified library and set its entry points' types from the header: ``(lib, "")`` or ``(None, why)``."""
    try:
        lib = ctypes.CDLL(str(target))
        lib.fastdml_row_scan_version.restype = ctypes.c_int64
        if lib.fastdml_row_scan_version() != _VERSION:
            return None, f"{target} has interface version {lib.fastdml_row_scan_version()}, not {_VERSION}"
        for name, argtypes in _prototypes().items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int64, argtypes
    except (OSError, AttributeError) as exc:
        return None, f"loading {target} failed: {exc}"
    return lib, ""


def _build() -> tuple[ctypes.CDLL | None, str, str]:
    """Find in the cache (verified) or compile, then load: ``(lib, "", note)`` or ``(None, why, "")``; ``note``
    says why a cached file was replaced."""
    cc, why = _compiler()
    if cc is None:
        return None, why, ""
    source = b"\0".join(path.read_bytes() for path in [_HEADER, *_SOURCES])
    version = _compiler_version(cc)
    base = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), version.encode(), _cpu_id().encode()]))
    failed = _cache_dir() / f"fastdml_native-{base.hexdigest()[:20]}.failed"
    why = _failed_before(failed)
    if why:
        return None, f"an earlier build failed (retried after {_RETRY_FAILED_BUILD_S:.0f} s; {failed}): {why}", ""
    errors, notes = [], []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([base.digest(), " ".join(flags).encode()]))
        target = _cache_dir() / f"fastdml_native-{key.hexdigest()[:20]}.so"
        flag_failed = target.with_name(target.name + ".failed")
        why = _failed_before(flag_failed)
        if why:
            errors.append(why)
            continue
        if target.exists():
            bad = _verify(target)
            if not bad:
                lib, why = _load(target)
                if lib is not None:
                    return lib, "", ""
                bad = why
            notes.append(f"rebuilt {target.name}: {bad}")
        why, flag_caused = _compile(cc, flags, target)
        if not why:
            bad = _verify(target)
            lib, why = (None, bad) if bad else _load(target)
            if lib is not None:
                return lib, "", "; ".join(notes)
        errors.append(why)
        if not flag_caused:  # a full disk or a broken compiler: the other flag sets would fail the same way
            break
        _remember_failure(flag_failed, why)
    why = "; ".join(notes + errors)
    _remember_failure(failed, why)
    return None, why, ""


def _switched_off() -> str | None:
    """Why the helpers are switched off (``disabled()``, ``FASTDML_NATIVE=0``), or None when they are not."""
    stack = getattr(_local, "disabled", None)
    if stack and stack[-1]:
        return "inside fastdml.blocked.native.disabled()"
    if os.environ.get("FASTDML_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "FASTDML_NATIVE=" + os.environ["FASTDML_NATIVE"]
    return None


def _library() -> ctypes.CDLL | None:
    if _switched_off() is not None:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"], _state["note"] = _build()
    return _state["lib"]


def enabled() -> bool:
    """True when the compiled functions will run (the library is built and loaded, and not switched off)."""
    return _library() is not None


def status() -> str:
    """Whether the compiled helpers are in use, and if not, why (for error reports and the docs): ``"on"``
    (``"on (rebuilt ...: why)"`` when a cached library failed its digest check or did not load), ``"off: why"``
    or ``"unavailable: why"``."""
    off = _switched_off()
    if off is not None:
        return "off: " + off
    if _library() is None:
        return "unavailable: " + _state["why"]
    return f"on ({_state['note']})" if _state["note"] else "on"


@contextlib.contextmanager
def disabled(flag: bool = True):
    """Within the block the compiled functions decline (``flag=True``) and the calling thread's callers use
    their torch ops; other threads are not affected."""
    if not hasattr(_local, "disabled"):
        _local.disabled = []
    _local.disabled.append(bool(flag))
    try:
        yield
    finally:
        _local.disabled.pop()


def _bad_argument(fn: str, code: int, **given) -> None:
    if code == _BAD_ARGUMENT:
        raise ValueError(f"{fn}: an offset or size is out of range: {given}")


def _check(fn: str, name: str, a: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    """The C code reads raw memory: every argument's shape, dtype, device and layout is checked, not assumed."""
    if tuple(a.shape) != shape or a.dtype != dtype or a.device.type != "cpu" or not a.is_contiguous():
        raise ValueError(f"{fn}: {name} must be a contiguous {shape} {dtype} CPU tensor, got {tuple(a.shape)} "
                         f"{a.dtype} on {a.device}{'' if a.is_contiguous() else ' (not contiguous)'}")  # fmt: skip


def label_codes(y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    """``(y, z)`` as contiguous CPU label arrays of the scan's label type: int64 as they are, or int32 (the
    float32 scan's lanes) when every label fits, else their ranks among the distinct labels (equal labels
    get equal codes, so the scan compares the same pairs)."""
    if dtype == torch.float64:
        return y.contiguous(), z.contiguous()
    both = torch.cat([y, z])
    if both.numel() and (int(both.min()) < -(2**31) or int(both.max()) >= 2**31):
        both = torch.unique(both, return_inverse=True)[1]
    both = both.to(torch.int32)
    return both[: y.numel()], both[y.numel() :]


def row_hardest_scan(t, y, z, excl, diag: int, pv, pi, nv, ni) -> bool:
    """For each row i of the (b, M) score block ``t``: ``pv[i], pi[i]`` = the largest score over the positive
    columns (``z[j] == y[i]``) and its lowest column, ``nv[i], ni[i]`` = the smallest over the negatives,
    skipping column ``excl[i]`` (``excl``: (b,) int64, -1 for none) or, with ``excl=None``, column
    ``diag + i`` (``diag < 0``: none). No positive: ``pv = -inf, pi = M``; no negative: ``nv = +inf, ni = M``.

    ``y``, ``z``: label codes from :func:`label_codes`. Writes the four (b,) outputs (contiguous, the dtype of
    ``t`` for values, int64 for indices) and returns True. Returns False when the library is unavailable (see
    :func:`status`; nothing written) or a kept score is NaN (the outputs are then unspecified: torch's max/min
    propagate NaN, the scan compares it as unordered, so the caller must compute them with torch).
    """
    lib = _library()
    if lib is None:
        return False
    b, M = t.shape
    if t.dtype == torch.float32:
        fn, label_dtype = lib.fastdml_row_hardest_f32, torch.int32
        if M >= 2**31:
            return False
    elif t.dtype == torch.float64:
        fn, label_dtype = lib.fastdml_row_hardest_f64, torch.int64
    else:
        return False
    _check("row_hardest_scan", "t", t, (b, M), t.dtype)
    for name, a, n, dt in (("y", y, b, label_dtype), ("z", z, M, label_dtype), ("pv", pv, b, t.dtype),
                           ("pi", pi, b, torch.int64), ("nv", nv, b, t.dtype), ("ni", ni, b, torch.int64),
                           ("excl", excl, b, torch.int64)):  # fmt: skip
        if a is not None or name != "excl":
            _check("row_hardest_scan", name, a, (n,), dt)
    nan_rows = fn(t.data_ptr(), b, M, y.data_ptr(), z.data_ptr(), 0 if excl is None else excl.data_ptr(), diag,
                  pv.data_ptr(), pi.data_ptr(), nv.data_ptr(), ni.data_ptr())  # fmt: skip
    _bad_argument("row_hardest_scan", nan_rows, b=b, M=M)
    return nan_rows == 0


def index_dtype(dtype: torch.dtype) -> torch.dtype:
    """The strip scan's column-number type for scores of ``dtype``: int32 beside float32 lanes, else int64."""
    return torch.int32 if dtype == torch.float32 else torch.int64


def row_hardest_strip(G, s: int, off, scale: float, y, bp, bpi, bn, bni) -> bool:
    """One strip of the square case's upper triangle (see ``csrc/row_scan.c``): ``G`` (b, W) holds
    ``x_a . x_c`` for the anchors ``a = s .. s+b-1`` and the columns ``c = s .. s+W-1 = N-1``; the score of
    anchor a against c is ``off[c] + scale * x_a . x_c``. Updates the running extremes ``bp``/``bpi``
    (farthest positive) and ``bn``/``bni`` (nearest negative) of every anchor the strip touches: its own
    rows against every column from s on, and the later anchors against its rows.

    ``off``, ``bp``, ``bn``: (N,) of G's dtype; ``bpi``, ``bni``: (N,) of :func:`index_dtype`; ``y``: (N,)
    label codes from :func:`label_codes`. Returns True; False when the library is unavailable or a score is
    NaN (the extremes are then unspecified: the caller computes them with torch).
    """
    lib = _library()
    if lib is None or G.dtype not in (torch.float32, torch.float64):
        return False
    b, W = G.shape
    N = s + W
    if G.dtype == torch.float32 and N >= 2**31:
        return False
    fn = lib.fastdml_row_hardest_strip_f32 if G.dtype == torch.float32 else lib.fastdml_row_hardest_strip_f64
    idt, ydt = index_dtype(G.dtype), (torch.int32 if G.dtype == torch.float32 else torch.int64)
    if not 0 < b <= W:
        raise ValueError(f"row_hardest_strip: G must be (b, W) with 0 < b <= W, got {tuple(G.shape)}")
    if s < 0:
        raise ValueError(f"row_hardest_strip: s must be a row number >= 0, got {s}")
    _check("row_hardest_strip", "G", G, (b, W), G.dtype)
    for name, a, dt in (("off", off, G.dtype), ("y", y, ydt), ("bp", bp, G.dtype), ("bpi", bpi, idt),
                        ("bn", bn, G.dtype), ("bni", bni, idt)):  # fmt: skip
        _check("row_hardest_strip", name, a, (N,), dt)
    nan_rows = fn(G.data_ptr(), b, W, s, off.data_ptr(), float(scale), y.data_ptr(), bp.data_ptr(),
                  bpi.data_ptr(), bn.data_ptr(), bni.data_ptr())  # fmt: skip
    _bad_argument("row_hardest_strip", nan_rows, b=b, W=W, s=s)
    return nan_rows == 0


_KIND_CODES = {"l2": 0, "sql2": 1, "dot": 2}


def chosen_triplets(x, ref, p, n, valid, kind, margin, smooth, low, high, gx, gcol):
    """The chosen-triplet loss of :mod:`fastdml.portable.chosen` (see its docstring and
    ``csrc/chosen_triplets.c``) in one call: ``S = sum term_i`` and ``C = #counted`` as a float64 ``[S, C]``
    tensor; writes ``gx`` (N, D) when given and adds the column parts to ``gcol`` (M, D; may be ``gx``: the
    square case) when given.

    ``x`` (N, D) and ``ref`` (M, D): contiguous CPU tensors of one dtype, float32 or float64; ``p``, ``n``
    (N,) int64; ``valid`` (N,) bool. Returns None (nothing written) when the library is unavailable, the
    dtype is another, a distance or term is not finite (the caller's torch ops follow torch's NaN rules), or
    an index is out of range (the caller's torch ops raise the error).
    """
    lib = _library()
    if lib is None or x.dtype not in (torch.float32, torch.float64):
        return None
    N, D = x.shape
    M = ref.shape[0]
    for name, a, shape, dt in (("x", x, (N, D), x.dtype), ("ref", ref, (M, D), x.dtype), ("p", p, (N,), torch.int64),
                               ("n", n, (N,), torch.int64), ("valid", valid, (N,), torch.bool),
                               ("gx", gx, (N, D), x.dtype), ("gcol", gcol, (M, D), x.dtype)):  # fmt: skip
        if a is not None or name not in ("gx", "gcol"):
            _check("chosen_triplets", name, a, shape, dt)
    fn = lib.fastdml_chosen_triplets_f32 if x.dtype == torch.float32 else lib.fastdml_chosen_triplets_f64
    coef = torch.empty(2 * N, dtype=x.dtype)
    stats = torch.empty(2, dtype=torch.float64)
    code = fn(x.data_ptr(), N, D, ref.data_ptr(), M, p.data_ptr(), n.data_ptr(), valid.data_ptr(), _KIND_CODES[kind],
              float(margin), int(bool(smooth)), float(low), float(high), 0 if gx is None else gx.data_ptr(),
              0 if gcol is None else gcol.data_ptr(), coef.data_ptr(), stats.data_ptr())  # fmt: skip
    _bad_argument("chosen_triplets", code, N=N, D=D, M=M, kind=kind)
    return stats if code == 0 else None


_KIND_TILE = {"l2": 0, "sql2": 1, "dot": 2}


def _disjoint(fn: str, **arrays) -> None:
    """Raise a ValueError naming two of ``arrays`` whose memory overlaps (the C marks them ``restrict``)."""
    spans = sorted(
        (a.data_ptr(), a.data_ptr() + a.numel() * a.element_size(), n) for n, a in arrays.items() if a.numel()
    )
    reach, owner = 0, None
    for start, end, name in spans:
        if owner is not None and start < reach:
            raise ValueError(f"{fn}: {owner} and {name} share memory; they must be separate buffers")
        if end > reach:
            reach, owner = end, name


def contrastive_tiles(x, xn, plo, phi, pdir, kind, bounds, pm, nm, near, rs, gx, stats):
    """The square contrastive sweep's compiled tile (see ``csrc/contrastive_tile.c``), its per-sweep arguments
    checked once: returns ``tile(v, si, sj, cp, cn) -> flags``, or None when the library is unavailable or
    the dtype is not float32/float64.

    ``x`` (N, D): the label-sorted rows; ``xn`` (N,) their squared norms; ``plo``/``phi`` (N,) int64: each row's
    positive columns; ``pdir`` (N,) uint8: rows whose positives take the direct-difference gradient;
    ``bounds``: the 8 interval ends on m (float64); ``near``: the near-duplicate factor (0: no check);
    ``stats`` float64 (4,) gets each tile's ``[S+, C+, S-, C-]`` added; with ``gx`` (2, N, D) given, the
    pair weights go to ``cp``/``cn`` and their sums to ``rs`` (float64 (2, N)). ``tile``: ``v`` (h, w) the
    GEMM's values of rows ``si..`` x columns ``sj..`` (modified where a near-duplicate is recomputed or on
    the diagonal); ``full``: a diagonal tile (``si == sj``, square) taken whole, each entry for its own pair
    (else only the entries above the diagonal, each for both orders); returns the flags (bit 0: ``cn``
    written, bit 1: ``cp`` holds a weight).
    """
    lib = _library()
    if lib is None or x.dtype not in (torch.float32, torch.float64):
        return None
    if kind not in _KIND_TILE:
        raise ValueError(f"contrastive_tiles: kind must be one of {tuple(_KIND_TILE)}, got {kind!r}")
    if kind == "dot" and near > 0:
        raise ValueError(f"contrastive_tiles: near must be 0 for kind 'dot' (no near-duplicate test), got {near}")
    if (rs is None) != (gx is None):
        raise ValueError("contrastive_tiles: rs and gx must be given together (the gradient) or both be None")
    N, D = x.shape
    t = x.dtype
    fn = lib.fastdml_contrastive_tile_f32 if t == torch.float32 else lib.fastdml_contrastive_tile_f64
    need_grad = gx is not None
    checks = [("x", x, (N, D), t), ("xn", xn, (N,), t), ("plo", plo, (N,), torch.int64),
              ("phi", phi, (N,), torch.int64), ("pdir", pdir, (N,), torch.uint8),
              ("bounds", bounds, (8,), torch.float64), ("stats", stats, (4,), torch.float64)]  # fmt: skip
    if need_grad:
        checks += [("rs", rs, (2, N), torch.float64), ("gx", gx, (2, N, D), t)]
    for name, a, shape, dt in checks:
        _check("contrastive_tiles", name, a, shape, dt)
    head = (N, D, x.data_ptr(), xn.data_ptr(), plo.data_ptr(), phi.data_ptr(), pdir.data_ptr(), _KIND_TILE[kind],
            bounds.data_ptr(), float(pm), float(nm), float(near))  # fmt: skip
    tail = (rs.data_ptr(), gx.data_ptr(), stats.data_ptr()) if need_grad else (0, 0, stats.data_ptr())

    def tile(v, si: int, sj: int, cp, cn, full: bool) -> int:
        h, w = v.shape
        _check("contrastive_tile", "v", v, (h, w), t)
        if need_grad:
            for name, a in (("cp", cp), ("cn", cn)):
                if a is None:
                    raise ValueError(f"contrastive_tile: {name} is required when the gradient is computed")
                _check("contrastive_tile", name, a, (h, w), t)
            _disjoint("contrastive_tile", v=v, cp=cp, cn=cn, x=x, gx=gx)
        code = fn(v.data_ptr(), h, w, si, sj, *head, int(full), int(need_grad),
                  cp.data_ptr() if need_grad else 0, cn.data_ptr() if need_grad else 0, *tail)  # fmt: skip
        if code == _NO_MEMORY:
            raise MemoryError("contrastive_tile: no memory for a row's near-duplicate flags")
        _bad_argument("contrastive_tile", code, h=h, w=w, si=si, sj=sj, N=N, D=D, kind=kind)
        return code

    tile.args = (x, xn, plo, phi, pdir, bounds, rs, gx, stats)  # the pointers' tensors stay alive with it
    return tile

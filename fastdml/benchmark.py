"""The timing table: fastdml against pytorch-metric-learning and the GEMM floor, one training step per case.

Used by ``python -m fastdml --bench`` (and so by ``bench/gpu_check.sh``). For each family and batch size N
(D = 128 by default, float32, labels from ``labels_for``), one step ``loss = f(x, y); loss.backward()`` is
timed: a warm-up call, then the median of up to ``repeats`` calls (within about a second), each ending with a
device synchronisation inside the timed region (``torch.cuda.synchronize``), measured with
``time.perf_counter``.

==============  =====================================================  ==============================================
family          fastdml                                                PML (the same call where PML has it)
==============  =====================================================  ==============================================
batch_hard      ``TripletMarginLoss()(x, y, BatchHardMiner()(x, y))``  identical
contrastive     ``ContrastiveLoss()(x, y)``                            identical
batch_all       ``BatchAllTripletLoss()(x, y)``                        ``TripletMarginLoss(margin=0.2)`` (AvgNonZero)
semihard        ``SemiHardTripletLoss()(x, y)``                        none (TF-Addons semantics)
all_triplets    ``TripletMarginLoss()(x, y)``                          identical
==============  =====================================================  ==============================================

The floor (impl ``"floor"``) is ``torch.mm(x, x.T)`` forward and backward in x's dtype: the GEMM every
distance-matrix method pays at least once.

Peak memory is the step's own peak above what was allocated before it: ``torch.cuda.max_memory_allocated``
on CUDA; on the CPU (Linux) the growth of the process's peak resident set (``VmHWM`` after resetting it via
``/proc/self/clear_refs``) during the warm-up call, an approximation (memory the allocator kept from earlier
calls is not seen again); elsewhere none. Cases predicted to need more memory than the device has are
skipped with the reason, and every case runs in ``try``/``except`` under a time guard, so one failure or hang
never loses the table.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

FAMILIES = ("batch_hard", "contrastive", "batch_all", "semihard", "all_triplets")
IMPLS = ("floor", "fastdml", "pml")
DEFAULT_SIZES = (256, 1024, 4096)
D = 128


class Unavailable(LookupError):
    """The implementation has no such case (PML not installed, no PML equivalent)."""


class CaseTimeout(Exception):
    """A case ran past its time guard."""


@dataclass
class Row:
    """One line of the table; ``ms`` and ``peak_bytes`` are None where the case did not run."""

    family: str
    n: int
    impl: str
    device: str
    precision: str = "ieee"
    labels: str = "random10"
    d: int = D
    dtype: str = "float32"
    ms: Optional[float] = None
    peak_bytes: Optional[float] = None
    memory_method: Optional[str] = None
    loss: Optional[float] = None
    first_call_s: Optional[float] = None
    repeats: int = 0
    backend: Optional[str] = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def labels_for(pattern: str, n: int, device) -> torch.Tensor:
    """Labels of a case: ``"random10"`` (10 classes drawn at random) or ``"pk4"`` (classes of 4, shuffled)."""
    g = torch.Generator().manual_seed(n)
    if pattern == "pk4":
        y = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    elif pattern == "random10":
        y = torch.randint(0, 10, (n,), generator=g)
    else:
        raise ValueError(f"labels must be 'random10' or 'pk4', got {pattern!r}")
    return y.to(device)


def build(impl: str, family: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The step's loss ``f(x, y)`` of an implementation; raises :class:`Unavailable` where there is none."""
    if impl == "floor":
        return lambda x, y: torch.mm(x, x.t()).sum()
    if impl == "fastdml":
        from fastdml import losses, miners
    elif impl == "pml":
        try:
            from pytorch_metric_learning import losses, miners
        except ImportError as exc:
            raise Unavailable(f"PML not importable ({exc})") from exc
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if family == "batch_hard":
        loss, miner = losses.TripletMarginLoss(), miners.BatchHardMiner()
        return lambda x, y: loss(x, y, miner(x, y))
    if family == "contrastive":
        return losses.ContrastiveLoss()
    if family == "batch_all":
        return losses.BatchAllTripletLoss() if impl == "fastdml" else losses.TripletMarginLoss(margin=0.2)
    if family == "semihard":
        if impl != "fastdml":
            raise Unavailable("PML has no TF-Addons semi-hard loss")
        return losses.SemiHardTripletLoss()
    if family == "all_triplets":
        return losses.TripletMarginLoss()
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def predicted_bytes(impl: str, family: str, n: int, d: int = D) -> float:
    """A rough upper estimate of a case's peak memory: PML holds N x N matrices and, for the all-triplet
    families, N^3 boolean masks; fastdml holds O(N D) plus its staging budget (256 MB)."""
    if impl == "floor":
        return 3 * 4 * n * n
    if impl == "fastdml":
        return 8 * n * d * 4 + 2**28
    mat = 4 * n * n * 6
    if family in ("batch_all", "all_triplets"):
        return mat + 2 * n**3
    return mat


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of the device (CUDA: the card; CPU: physical memory, from sysconf), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS, XPU); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------------
def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(m.group(1)) * 1024


def _release_free_heap() -> None:
    # hand glibc's free pages back, so that a call cannot be served unseen from pages an earlier call left
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds, after the block, ``peak_bytes`` (the block's peak above what was allocated
    before it, or None where the device has no meter) and ``method`` (``"cuda"``, ``"rss"`` or None)."""
    out: dict = {"peak_bytes": None, "method": None}
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        synchronize(device)
        out.update(peak_bytes=float(torch.cuda.max_memory_allocated(device) - base), method="cuda")
        return
    rss = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")
    base = None
    if rss:
        try:
            _release_free_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _proc_status_bytes("VmRSS")
        except OSError:
            base = None
    yield out
    if base is not None:
        out.update(peak_bytes=float(max(0, _proc_status_bytes("VmHWM") - base)), method="rss")


# --------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise :class:`CaseTimeout` in the block after ``seconds`` (SIGALRM: main thread on POSIX, else none)."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread() and seconds > 0

    def _alarm(signum, frame):
        raise CaseTimeout(f"case time limit ({seconds:.0f} s)")

    if not usable:
        yield
        return
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def time_step(fn, x: torch.Tensor, y: torch.Tensor, repeats: int = 5, target_s: float = 2.0) -> dict:
    """Time ``fn(x, y).backward()`` on x's device: a warm-up call (also measured for peak memory), then the
    median of up to ``repeats`` calls within about ``target_s`` seconds, each synchronised before its clock
    stops. Returns ``ms``, ``peak_bytes``, ``memory_method``, ``loss`` (the warm-up's value), ``first_call_s``
    and ``repeats``."""
    device = x.device

    def step():
        loss = fn(x, y)
        loss.backward()
        synchronize(device)
        return loss

    synchronize(device)
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        loss = step()
        first = time.perf_counter() - t0
    value = float(loss.detach().float().cpu())
    del loss
    x.grad = None
    reps = max(1, min(repeats, int(target_s / max(first, 1e-4))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        x.grad = None
    times.sort()
    return {
        "ms": times[len(times) // 2],
        "peak_bytes": mem["peak_bytes"],
        "memory_method": mem["method"],
        "loss": value,
        "first_call_s": first,
        "repeats": reps,
    }


def run_table(
    device: str | torch.device,
    sizes=DEFAULT_SIZES,
    families=FAMILIES,
    impls=IMPLS,
    precision: str = "ieee",
    labels: str = "random10",
    d: int = D,
    repeats: int = 5,
    case_s: float = 60.0,
    budget_s: float = float("inf"),
    on_row: Optional[Callable[[Row], None]] = None,
) -> list[Row]:
    """Time every (N, family, impl) case on ``device``; the floor once per N. ``budget_s`` stops starting
    new cases once spent; ``case_s`` guards each case; ``on_row`` sees each row as it is finished (to
    print or save progress). ``precision`` is recorded with each row: the caller sets it."""
    device = torch.device(device)
    total = device_memory_bytes(device)
    rows: list[Row] = []
    start = time.perf_counter()
    for n in sizes:
        plan = [("gemm_floor", "floor")] if "floor" in impls else []
        plan += [(f, i) for f in families for i in impls if i != "floor"]
        for family, impl in plan:
            row = Row(family=family, n=int(n), impl=impl, device=str(device), precision=precision, labels=labels, d=d)
            rows.append(row)
            spent = time.perf_counter() - start
            need = predicted_bytes(impl, family, n, d)
            if spent > budget_s:
                row.note = f"skipped: time budget ({budget_s:.0f} s) spent"
            elif total is not None and need > 0.8 * total:
                row.note = f"skipped: predicted {need / 2**30:.1f} GiB > 80% of the device's {total / 2**30:.0f} GiB"
            else:
                _run_case(row, device, repeats, min(case_s, max(5.0, budget_s - spent + 5.0)))
            if on_row is not None:
                on_row(row)
    return rows


def _run_case(row: Row, device: torch.device, repeats: int, case_s: float) -> None:
    x = y = None
    try:
        fn = build(row.impl, "contrastive" if row.family == "gemm_floor" else row.family)
        g = torch.Generator().manual_seed(row.n)
        x = torch.randn(row.n, row.d, generator=g).to(device).requires_grad_(True)
        y = labels_for(row.labels, row.n, device)
        if row.impl == "fastdml":
            from fastdml import dispatch

            row.backend = dispatch.backend_for(x)
        with time_guard(case_s):
            res = time_step(fn, x, y, repeats=repeats, target_s=min(1.0, case_s / 4))
        row.ms, row.peak_bytes, row.memory_method = res["ms"], res["peak_bytes"], res["memory_method"]
        row.loss, row.first_call_s, row.repeats = res["loss"], res["first_call_s"], res["repeats"]
        if not math.isfinite(row.loss):
            row.note = "non-finite loss"
    except Unavailable as exc:
        row.note = f"n/a: {exc}"
    except CaseTimeout as exc:
        row.note = f"timeout: {exc}"
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    except Exception as exc:  # recorded, and the table goes on
        row.note = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        row.extra["traceback"] = traceback.format_exc(limit=8)
    finally:
        del x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------------
def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def markdown(rows: list[Row]) -> str:
    """The table in markdown, with each row's time as a multiple of fastdml's (same device, precision, N,
    family) and of the floor's (same device, precision, N)."""
    key = lambda r: (r.device, r.precision, r.n, r.labels)
    fast = {key(r) + (r.family,): r for r in rows if r.impl == "fastdml" and r.ms}
    floor = {key(r): r for r in rows if r.impl == "floor" and r.ms}
    lines = [
        "| device | precision | N | family | impl | ms | peak MB | loss | x fastdml | x floor | note |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        f, fl = fast.get(key(r) + (r.family,)), floor.get(key(r))
        vs_fast = f"{r.ms / f.ms:.2f}" if f and r.ms and r.impl == "pml" else "-"
        vs_floor = f"{r.ms / fl.ms:.2f}" if fl and r.ms and r.impl != "floor" else "-"
        loss = "-" if r.loss is None else f"{r.loss:.6g}"
        note = r.note or (f"backend={r.backend}" if r.backend else "")
        lines.append(
            f"| {r.device} | {r.precision} | {r.n} | {r.family} | {r.impl} | {fmt_ms(r.ms)} | "
            f"{fmt_mb(r.peak_bytes)} | {loss} | {vs_fast} | {vs_floor} | {note} |"
        )
    return "\n".join(lines)

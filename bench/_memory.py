"""Peak memory of one call of a benchmark case.

- **CUDA**: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the call (inputs, loss objects): the call's own peak.
- **CPU**: there is no allocator counter, so the case runs in a separate worker process and the peak
  resident-set growth is read from the kernel: after the imports, a small warm-up call (lazy initialisation)
  and the creation of the inputs, the worker resets its high-water mark (``/proc/self/clear_refs`` <- ``5``),
  reads ``VmRSS`` (the baseline), runs the call once and reads ``VmHWM``. The peak growth ``VmHWM - VmRSS``
  is what the call itself needed. The worker runs with a fixed ``MALLOC_MMAP_THRESHOLD_`` so that glibc
  returns every large freed block to the kernel and never serves a call from memory an earlier call left
  behind (which would hide it from RSS).

A guard thread in the worker watches its RSS and ends the worker cleanly (reported as "memory guard")
before it reaches the limit, so a mispredicted baseline never meets the OOM killer; the timed run in the
pytest process happens only after the worker came back.

CPU measurements are cached per case in ``bench/out/memory_cache.json`` (keyed by the case and a
fingerprint of the library sources and versions), so the report does not measure a case twice.

``python -m bench._memory --worker`` is the worker's entry point; ``python -m bench._memory CASE_ID...``
measures cases from the command line (ids as in :attr:`bench._cases.Case.id`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import torch

from . import _cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, "bench", "out", "memory_cache.json")
_MMAP_THRESHOLD = "131072"


# ------------------------------------------------------------------------------------------------------
# /proc readings
# ------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        text = f.read()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_supported() -> bool:
    try:
        reset_hwm()
        return hwm_bytes() <= rss_bytes() + (1 << 20)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------
# CUDA: in process
# ------------------------------------------------------------------------------------------------------
def cuda_peak(step) -> dict:
    """Peak bytes allocated by one call of ``step`` on the current CUDA device, above what was live before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    loss = float(out.detach().float().item())
    del out
    return {"peak_bytes": float(peak), "baseline_bytes": float(base), "seconds": dt, "loss": loss, "method": "cuda"}


# ------------------------------------------------------------------------------------------------------
# CPU: the worker process
# ------------------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_in_worker(case: _cases.Case) -> dict:
    # warm-up at a small size: imports, thread pools and other lazy state are created here, not in the call
    warm = case.replace(n=min(case.n, 64))
    x, y = _cases.make_inputs(warm)
    _cases.make_step(warm, x, y)()
    del x, y
    gc.collect()
    x, y = _cases.make_inputs(case)
    step = _cases.make_step(case, x, y)
    gc.collect()
    # hand every free heap page back to the kernel: a call must not be served, unseen, from pages that an
    # earlier call left resident (small blocks live in malloc's arenas, below the mmap threshold)
    _malloc_trim()
    reset_hwm()
    base = rss_bytes()
    t0 = time.perf_counter()
    out = step()
    dt = time.perf_counter() - t0
    # (RSS can shrink below the baseline during the call; the growth is then 0, never negative)
    peak = max(0, hwm_bytes() - base)
    loss = float(out.detach().float().item())
    del out, step, x, y
    gc.collect()
    return {"peak_bytes": float(peak), "baseline_bytes": float(base), "seconds": dt, "loss": loss, "method": "rss"}


def _guard(limit: float, lock: threading.Lock) -> None:
    while True:
        time.sleep(0.01)
        try:
            rss = rss_bytes()
        except Exception:
            continue
        if rss > limit:
            with lock:
                sys.stdout.write(json.dumps({"error": f"memory guard: RSS {rss / 1e9:.2f} GB > {limit / 1e9:.2f} GB"}))
                sys.stdout.write("\n")
                sys.stdout.flush()
            os._exit(3)


def worker_main(limit: float) -> None:
    lock = threading.Lock()
    threading.Thread(target=_guard, args=(limit, lock), daemon=True).start()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            case = _cases.Case.from_dict(json.loads(line))
            reply = _measure_in_worker(case)
        except _cases.Unavailable as exc:
            reply = {"unavailable": str(exc)}
        except Exception as exc:  # reported to the parent, which decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        with lock:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


class Worker:
    """The parent's handle on one worker process (started on first use, restarted after a failure)."""

    def __init__(self, limit: float):
        self.limit = limit
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        env["MALLOC_MMAP_THRESHOLD_"] = _MMAP_THRESHOLD
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._memory", "--worker", "--limit-bytes", str(self.limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def measure(self, case: _cases.Case, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(case.to_dict()) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"error": f"timeout: no result within {timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"error": f"worker died (exit code {code})"}
        reply = json.loads(line)
        if "error" in reply and reply["error"].startswith("memory guard"):
            self.proc.wait()
            self.proc = None
        return reply


# ------------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------------
def fingerprint() -> str:
    """Hash of what a measurement depends on: library and bench sources, versions, memory budget."""
    h = hashlib.sha1()
    for folder in ("fastdml", "kernels", "bench"):
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "out"))
            for name in sorted(filenames):
                if not name.endswith(".py") or (folder == "bench" and name not in ("_cases.py", "_memory.py")):
                    continue
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    v = _cases.versions()
    h.update(json.dumps({k: v.get(k) for k in ("torch", "triton", "pml")}, sort_keys=True).encode())
    h.update(os.environ.get("FASTDML_MEMORY_BUDGET_MB", "").encode())
    h.update(os.environ.get("FASTDML_BACKEND", "").encode())
    return h.hexdigest()[:16]


class MemoryMeter:
    """Measures (and caches) the peak memory of cases."""

    def __init__(self, cache_path: str | None = DEFAULT_CACHE, limit: float | None = None):
        self.cache_path = cache_path
        self.limit = limit
        self._worker: Worker | None = None
        self._fp = fingerprint()
        self._cache = {}
        if cache_path and os.path.exists(cache_path):
            try:
                with open(cache_path) as f:
                    self._cache = json.load(f)
            except (OSError, ValueError):
                self._cache = {}

    def _key(self, case: _cases.Case) -> str:
        return f"{case.id}|{self._fp}"

    def cached(self, case: _cases.Case) -> dict | None:
        return self._cache.get(self._key(case))

    def measure_cpu(self, case: _cases.Case, timeout: float = 600.0) -> dict:
        """Peak RSS growth of one call of ``case`` (from the cache when measured before with these sources)."""
        hit = self.cached(case)
        if hit is not None:
            return dict(hit, cached=True)
        if self._worker is None:
            limit = self.limit if self.limit is not None else _cases.memory_limit_bytes("cpu")
            self._worker = Worker(limit)
        reply = self._worker.measure(case, timeout)
        if "peak_bytes" in reply:
            self._cache[self._key(case)] = reply
            self._save()
        return reply

    def _save(self) -> None:
        if not self.cache_path:
            return
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        tmp = self.cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._cache, f, indent=0, sort_keys=True)
        os.replace(tmp, self.cache_path)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def _parse_case_id(text: str) -> _cases.Case:
    variant, impl, mode, n, d, dtype, labels, device = text.split("-")
    family = next(f for f, vs in _cases.VARIANTS.items() if any(v.name == variant for v in vs))
    return _cases.Case(family, variant, impl, mode, int(n[1:]), int(d[1:]), dtype, labels, device)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help="run as the measuring worker (JSON lines on stdin)")
    ap.add_argument("--limit-bytes", type=float, default=None)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("cases", nargs="*", help="case ids as in bench._cases.Case.id")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.limit_bytes if args.limit_bytes else _cases.memory_limit_bytes("cpu"))
        return
    meter = MemoryMeter(None if args.no_cache else DEFAULT_CACHE, args.limit_bytes)
    try:
        for text in args.cases:
            case = _parse_case_id(text)
            r = meter.measure_cpu(case)
            peak = _cases.fmt_bytes(r.get("peak_bytes"))
            note = r.get("error", r.get("unavailable", ""))
            print(f"{case.id}: peak {peak}, {r.get('seconds', float('nan')):.3f} s", note)
    finally:
        meter.close()


if __name__ == "__main__":
    main()

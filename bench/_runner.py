"""Runs one benchmark case under pytest-benchmark: predict, measure memory, warm up, time, record.

Order for each case:

1. the interpreter is never timed: a case whose fastdml ops would run Triton on the CPU is skipped;
2. the prediction (:func:`bench._cases.predict`): over the memory limit or over the time limit -> skipped,
   recorded with the predicted bytes and seconds (the call is never started);
3. peak memory of one call (CPU: a worker process, guarded, cached; CUDA: in process). A worker that hit
   its memory guard, or a call measured over the time limit, skips the timing with that finding;
4. warm-up: one call at a small N (lazy initialisation), then one full call unless it is slow;
5. timing: ``benchmark.pedantic`` with the device synchronized inside the timed call, rounds chosen from
   the first timing so that slow cases run few rounds;
6. ``extra_info``: peak memory, prediction, N, D, dtype, device, labels, versions, the loss value.

Skips and failures go to the session's record list (written next to the benchmark JSON), so the report can
show what was not run and why.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from . import _cases, _memory


def _interpreted(case: _cases.Case, x: torch.Tensor) -> bool:
    """True when the case's ops would run Triton kernels under the interpreter (CPU tensors, or any tensor
    with TRITON_INTERPRET=1): such runs are never timed."""
    if case.impl == "pml" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        backend = _cases.resolved_backend(case, x)
    except Exception:
        return False
    return backend == "triton"


def _skip(session, case, reason, **info):
    session.record(case, "skipped", reason=reason, **info)
    pytest.skip(reason)


def _check_against_reference(case: _cases.Case, x, y, loss: torch.Tensor) -> None:
    """Tiny mode: the timed call must compute the same number as fastdml's reference on the same inputs."""
    if case.mode == "fwdbwd":
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"{case.id}: gradient missing or not finite"
    if case.impl == "reference":
        return
    ref_case = case.replace(impl="reference")
    try:
        ref_step = _cases.make_step(ref_case.replace(mode="fwd"), x, y)
    except _cases.Unavailable:
        return
    ref = ref_step()
    tol = {"float64": (1e-9, 1e-9), "float32": (1e-5, 1e-4)}.get(case.dtype, (1e-2, 1e-2))
    a, b = float(loss.detach().double()), float(ref.detach().double())
    assert math.isfinite(a), f"{case.id}: loss is not finite ({a})"
    assert abs(a - b) <= tol[0] + tol[1] * abs(b), f"{case.id}: loss {a!r} differs from the reference {b!r}"


def choose_rounds(first_s: float, target_s: float, max_rounds: int) -> int:
    """Rounds so that a case takes about ``target_s``: at least 1 for multi-second calls, at least 3 otherwise."""
    if first_s <= 0:
        return max_rounds
    r = int(math.ceil(target_s / first_s))
    floor = 1 if first_s > 3.0 else (2 if first_s > 1.0 else 3)
    return max(floor, min(max_rounds, r))


def run_case(case: _cases.Case, benchmark, session) -> None:
    opts = session.opts
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if session.over_budget():
        _skip(session, case, f"time budget of {opts.budget_s:.0f} s used up: not run")
    pred = _cases.predict(case, session.timing_below(case))
    limit = session.mem_limit(case.device)
    pinfo = {"predicted_bytes": pred["bytes"], "predicted_s": pred["seconds"], "formula": pred["formula"]}
    if pred["bytes"] > limit:
        _skip(
            session,
            case,
            f"predicted peak {_cases.fmt_bytes(pred['bytes'])} > limit {_cases.fmt_bytes(limit)} "
            f"({pred['formula']}): not run",
            **pinfo,
        )
    if pred["seconds"] > _cases.TIME_LIMIT_S:
        _skip(
            session,
            case,
            f"predicted {_cases.fmt_seconds(pred['seconds'])} per call > {_cases.TIME_LIMIT_S:.0f} s: not run",
            **pinfo,
        )

    x, y = _cases.make_inputs(case)
    if _interpreted(case, x):
        _skip(session, case, "the Triton interpreter is never timed (TRITON_INTERPRET=1)")
    try:
        step = _cases.make_step(case, x, y)
    except _cases.Unavailable as exc:
        _skip(session, case, f"unavailable: {exc}")

    # -- peak memory of one call (before any timed run: a guard trip means the timing is not attempted)
    mem = None
    if opts.memory and case.device == "cuda":
        try:
            small = case.replace(n=min(case.n, 64))
            _cases.make_step(small, *_cases.make_inputs(small))()
            # one full call first: Triton's autotuning (and its 256 MB cache-flush buffer) runs in the first
            # call at a new shape and is not part of a call's memory
            step()
            mem = _memory.cuda_peak(step)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            _skip(session, case, f"CUDA out of memory: {str(exc).splitlines()[0]}", **pinfo)
        except (_cases.Unavailable, NotImplementedError) as exc:
            _skip(session, case, f"unavailable: {exc}")
    elif opts.memory:
        timeout = max(120.0, 4 * pred["seconds"] + 60)
        mem = session.meter.measure_cpu(case, timeout=timeout)
        if "unavailable" in mem:
            _skip(session, case, f"unavailable: {mem['unavailable']}")
        if "error" in mem:
            err = mem["error"]
            if err.startswith(("memory guard", "timeout", "worker died")):
                _skip(session, case, f"measured run failed: {err}", **pinfo)
            if "NotImplementedError" in err:
                _skip(session, case, f"unavailable: {err}")
            session.record(case, "failed", reason=err, **pinfo)
            pytest.fail(f"{case.id}: the call failed in the memory worker: {err}")
        session.note_timing(case, mem["seconds"])
        if mem["seconds"] > _cases.TIME_LIMIT_S:
            _skip(
                session,
                case,
                f"one call took {_cases.fmt_seconds(mem['seconds'])} (> {_cases.TIME_LIMIT_S:.0f} s): not timed",
                measured_bytes=mem["peak_bytes"],
                **pinfo,
            )

    # -- warm-up: lazy state at a small size, then the full size unless slow
    try:
        small = case.replace(n=min(case.n, 64))
        _cases.make_step(small, *_cases.make_inputs(small))()
        first = mem["seconds"] if mem else None
        # a full-size warm-up only where it is cheap: a multi-second call is warm after the small one
        if first is None or first < 3.0 or not benchmark.enabled:
            t0 = time.perf_counter()
            loss = step()
            first = time.perf_counter() - t0
        else:
            loss = None
    except NotImplementedError as exc:
        _skip(session, case, f"unavailable: NotImplementedError: {exc}")

    if session.tiny and loss is not None:
        _check_against_reference(case, x, y, loss)

    session.note_timing(case, first)
    rounds = choose_rounds(first, opts.target_s, opts.max_rounds)
    warmup = 1 if first < 1.0 else 0
    benchmark.group = case.key
    info = benchmark.extra_info
    info.update(case.to_dict())
    info.update(
        {
            "variant_call": _cases.variant(case.family, case.variant).call,
            "peak_bytes": None if mem is None else mem["peak_bytes"],
            "memory_method": None if mem is None else mem["method"],
            "memory_cached": bool(mem and mem.get("cached")),
            "first_call_s": first,
            "rounds": rounds,
            "warmup_rounds": warmup,
            "machine": _cases.machine(case.device),
            "versions": _cases.versions(),
            "backend": _cases.resolved_backend(case, x) if case.impl != "pml" else "pml",
            **pinfo,
        }
    )
    result = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    info["loss"] = float(result.detach().float()) if isinstance(result, torch.Tensor) else None
    session.record(case, "measured", peak_bytes=info["peak_bytes"], **pinfo)

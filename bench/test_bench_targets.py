"""The headline comparison: the drop-in API against PML's identical call, in one process, alternating runs.

The CPU targets, at N = 1024, D = 128, fp32, 10 random classes, forward+backward:

==============================================  ==========  ===========
call                                            speed-up    less memory
==============================================  ==========  ===========
``TripletMarginLoss()`` (all triplets)          >= 100x     >= 50x
``TripletMarginLoss`` + ``TripletMarginMiner``  >= 10x      >= 3x
(``type_of_triplets="semihard"``)
``ContrastiveLoss()``                           >= 3x       >= 4x
``TripletMarginLoss`` + ``BatchHardMiner``      >= 5x       >= 4x
==============================================  ==========  ===========

The timed calls alternate (fastdml, PML, PML, fastdml, ...) so that a change in the machine's load hits
both alike; peak memory comes from the same meter as the suites (cached per case). The ratios are recorded
(the report prints them against the goals); nothing here asserts a speed. In tiny mode (CI) each pair of
calls is checked to give the same loss.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from bench import _cases, _memory
from bench.targets import TARGET_D, TARGET_N, TARGETS, alternate, target_case, timed


def _peak(session, case, step) -> float | None:
    if not session.opts.memory:
        return None
    if case.device == "cuda":
        r = _memory.cuda_peak(step)
    else:
        r = session.meter.measure_cpu(case, timeout=max(120.0, 4 * _cases.predict(case)["seconds"] + 60))
    if "seconds" in r:
        session.note_timing(case, r["seconds"])
    return r.get("peak_bytes")


@pytest.mark.parametrize("name", list(TARGETS))
def test_target(name, bench_session):
    session = bench_session
    opts = session.opts
    family, variant, goal_speed, goal_mem = TARGETS[name]
    n, d = (70, 8) if session.tiny else (TARGET_N, TARGET_D)
    device = opts.device
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if session.over_budget():
        session.record({"target": name}, "skipped", reason="time budget used up")
        pytest.skip("time budget used up")
    fd = target_case(name, n, d, device)
    pm = fd.replace(impl="pml")
    known = session.known_timing(pm)
    pred = _cases.predict(pm, session.timing_below(pm))
    if known is not None:
        pred["seconds"] = known
    if pred["bytes"] > session.mem_limit(device) or pred["seconds"] > _cases.TIME_LIMIT_S:
        session.record({"target": name}, "skipped", reason="PML predicted over the limits", predicted=pred)
        pytest.skip(f"PML predicted {_cases.fmt_bytes(pred['bytes'])}, {_cases.fmt_seconds(pred['seconds'])}")
    x, y = _cases.make_inputs(fd)
    try:
        step_fd = _cases.make_step(fd, x, y)
        step_pm = _cases.make_step(pm, x, y)
    except _cases.Unavailable as exc:
        session.record({"target": name}, "skipped", reason=f"unavailable: {exc}")
        pytest.skip(f"unavailable: {exc}")

    mem_fd = _peak(session, fd, step_fd)
    mem_pm = _peak(session, pm, step_pm)

    # warm-up: a small call each, then one full call each unless known to be slow (the first timing)
    for c in (fd, pm):
        s = c.replace(n=min(n, 64))
        _cases.make_step(s, *_cases.make_inputs(s))()
    slow_fd, slow_pm = session.known_timing(fd), session.known_timing(pm)
    t_fd = [slow_fd if (slow_fd or 0) > 3.0 else timed(step_fd)]
    t_pm = [slow_pm if (slow_pm or 0) > 3.0 else timed(step_pm)]
    if session.tiny:
        a, b = float(step_fd().detach()), float(step_pm().detach())
        assert abs(a - b) <= 1e-5 + 1e-4 * abs(b), f"{name}: fastdml {a!r} != PML {b!r} on the same inputs"
        rounds = 1
    else:
        per_round = t_fd[0] + t_pm[0]
        rounds = max(3, min(opts.max_rounds, int(3 * opts.target_s / max(per_round, 1e-6)) + 1))
        t_fd, t_pm = alternate(step_fd, step_pm, rounds)
    med_fd, med_pm = statistics.median(t_fd), statistics.median(t_pm)
    speedup = med_pm / med_fd if med_fd > 0 else float("nan")
    mem_ratio = (mem_pm / mem_fd) if (mem_fd and mem_pm) else None
    session.record(
        {"target": name, "family": family, "variant": variant, "n": n, "d": d, "device": device},
        "target",
        call=_cases.variant(family, variant).call,
        fastdml_s=t_fd,
        pml_s=t_pm,
        fastdml_median_s=med_fd,
        pml_median_s=med_pm,
        speedup=speedup,
        fastdml_peak_bytes=mem_fd,
        pml_peak_bytes=mem_pm,
        memory_ratio=mem_ratio,
        goal_speedup=goal_speed,
        goal_memory=goal_mem,
        rounds=rounds,
    )
    assert all(t > 0 for t in t_fd + t_pm)

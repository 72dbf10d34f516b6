"""Working memory, block planning, determinism and input errors of the blocked CPU path.

Memory is measured, not assumed: a subprocess resets its peak RSS (``/proc/self/clear_refs``), runs one op
and reads ``VmHWM``. At N = M = 3000 the reference materializes several 36 MB matrices (hundreds of MB);
the blocked ops must stay within the budget (plus their outputs and some allocator slack). The same
measurement of the reference proves the check can fail.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastdml import blocked
from fastdml.blocked import budget
from fastdml.config import memory_budget

from .blocked_cases import CONTRASTIVE_CONFIGS, TRIPLET_CONFIGS, make_inputs

INF = math.inf

_MEASURE = r"""
import gc, json, math, sys
import torch
torch.set_num_threads(1)
from fastdml import blocked, reference
from fastdml.config import memory_budget
inf = math.inf
which, op, n, d, mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

g = torch.Generator().manual_seed(0)
X = torch.randn(n, d, generator=g)
Y = torch.randint(0, 10, (n,), generator=g)

def call(x, y):
    if which == "reference":
        return reference.contrastive_stats(x, y, None, None, None, "l2", 0.0, 1.0, -inf, inf, 0.0, inf)
    if op == "contrastive":
        return blocked.contrastive_stats_fwd(x, y, None, None, None, "l2", 0.0, 1.0, -inf, inf, 0.0, inf, True)
    if op == "contrastive_mean":  # counted and active differ on both branches: every mask is its own buffer
        return blocked.contrastive_stats_fwd(x, y, None, None, None, "l2", 0.2, 1.3, -inf, inf, -inf, inf, True)
    if op == "triplet":
        return blocked.triplet_stats_fwd(x, y, None, None, None, "l2", 0.1, False, -inf, inf, 0.0, inf, True)
    if op == "smooth":
        return blocked.triplet_stats_fwd(x, y, None, None, None, "l2", 0.1, True, -inf, inf, 0.0, inf, True)
    if op == "semihard":
        return blocked.semihard_stats_fwd(x, y, None, None, None, "l2", 0.1, True)
    if op == "row_extreme":
        return blocked.row_extreme(x, y, None, None, None, "l2", "neg", "min", -inf, inf, None, "")
    if op == "row_hardest":
        return blocked.row_hardest(x, y, None, None, None, "l2")
    if op == "pair_list":
        return blocked.pair_list(x, y, None, None, None, "l2", 5.5, 4.0)
    raise ValueError(op)

call(X[:64], Y[:64])  # warm up (lazy initialisation, BLAS buffers)
with memory_budget(mb):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    out = call(X, Y)
    peak = status("VmHWM")
outs = out if isinstance(out, tuple) else (out,)
print(json.dumps({"extra": peak - base, "outputs": sum(t.numel() * t.element_size() for t in outs)}))
"""


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return any(line.startswith("VmHWM:") for line in f)
    except OSError:
        return False


def measure(which, op, n=3000, d=16, mb=8.0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, which, op, str(n), str(d), str(mb)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs")

# allocator slack: glibc keeps freed blocks mapped, rounds to pages and fragments a little
SLACK = 0.5


@needs_proc
@pytest.mark.parametrize(
    "op", ["contrastive", "triplet", "smooth", "semihard", "row_extreme", "row_hardest", "pair_list"]
)
def test_peak_working_memory_stays_within_the_budget(op):
    # the softplus path materializes (anchor, positive, negative) chunks: a smaller problem, a smaller budget
    n, mb = (700, 2.0) if op == "smooth" else (3000, 8.0)
    got = measure("blocked", op, n=n, mb=mb)
    limit = (1 + SLACK) * mb * 2**20 + got["outputs"]
    assert got["extra"] <= limit, f"{op}: peak extra RSS {got['extra'] / 2**20:.1f} MB > {limit / 2**20:.1f} MB"


@needs_proc
@pytest.mark.parametrize("op", ["contrastive", "contrastive_mean"])
def test_dense_contrastive_pass_stays_within_the_budget(op):
    """D = 2 and N = 384: the square contrastive problem takes the dense pass (checked here), whose measured
    peak must fit the same budget."""
    from fastdml import dispatch

    n, mb = 384, 4.0
    with memory_budget(mb):
        assert dispatch.contrastive_dense_sweep(True, n, 4, 2 * n * 2 * 4)
    got = measure("blocked", op, n=n, d=2, mb=mb)
    limit = (1 + SLACK) * mb * 2**20 + got["outputs"]
    assert got["extra"] <= limit, f"{op}: peak extra RSS {got['extra'] / 2**20:.1f} MB > {limit / 2**20:.1f} MB"


@needs_proc
def test_memory_measurement_sees_the_reference_materializing():
    """The same measurement on the reference exceeds the limit many times over (the check can fail)."""
    mb = 8.0
    got = measure("reference", "contrastive", mb=mb)
    assert got["extra"] > 5 * (1 + SLACK) * mb * 2**20


def test_block_plan_respects_the_budget():
    """Every block the ops plan fits the budget (down to one row); with room, the N x M matrix is one block."""
    x, y, r, z, excl = make_inputs(200, 8, torch.float32, False, seed=20, m=150)
    budget.peak_log = []
    try:
        for mb in (0.1, 64.0):
            with memory_budget(mb):
                limit = mb * 2**20
                blocked.contrastive_stats_fwd(x, y, r, z, excl, "l2", *CONTRASTIVE_CONFIGS["avgnonzero"], True)
                blocked.triplet_stats_fwd(x, y, r, z, excl, "l2", *TRIPLET_CONFIGS["all_avgnonzero"], True)
                blocked.semihard_stats_fwd(x, y, r, z, excl, "l2", 0.2, True)
                blocked.row_extreme(x, y, r, z, excl, "l2", "pos", "max", -INF, INF, None, "")
                blocked.row_hardest(x, y, r, z, excl, "l2")
                assert budget.peak_log and max(budget.peak_log) <= limit
                budget.peak_log.clear()
    finally:
        budget.peak_log = None
    with memory_budget(64.0):
        assert budget.rows_per_block(200, 150, 64) == 200
    with memory_budget(0.001):
        assert budget.rows_per_block(200, 150, 64) == 1


def test_runs_are_bitwise_deterministic():
    x, y, r, z, excl = make_inputs(70, 9, torch.float32, False, seed=21)
    with memory_budget(0.05):
        for fn, args in [
            (blocked.contrastive_stats_fwd, CONTRASTIVE_CONFIGS["band_threshold"]),
            (blocked.triplet_stats_fwd, TRIPLET_CONFIGS["all_avgnonzero"]),
            (blocked.triplet_stats_fwd, TRIPLET_CONFIGS["smooth"]),
            (blocked.semihard_stats_fwd, (0.2,)),
        ]:
            a = fn(x, y, r, z, excl, "l2", *args, True)
            b = fn(x, y, r, z, excl, "l2", *args, True)
            for u, v in zip(a, b):
                assert torch.equal(u, v)
        a = blocked.row_extreme(x, y, r, z, excl, "l2", "neg", "min", -INF, INF, None, "")
        b = blocked.row_extreme(x, y, r, z, excl, "l2", "neg", "min", -INF, INF, None, "")
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_deterministic_algorithms_mode_is_honoured():
    x, y, r, z, excl = make_inputs(40, 5, torch.float32, False, seed=22)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = blocked.triplet_stats_fwd(x, y, r, z, excl, "l2", *TRIPLET_CONFIGS["all_avgnonzero"], True)
        s = blocked.semihard_stats_fwd(x, y, r, z, excl, "l2", 0.2, True)
        c = blocked.contrastive_stats_fwd(x, y, r, z, excl, "l2", *CONTRASTIVE_CONFIGS["avgnonzero"], True)
    finally:
        torch.use_deterministic_algorithms(prev)
    b = blocked.triplet_stats_fwd(x, y, r, z, excl, "l2", *TRIPLET_CONFIGS["all_avgnonzero"], True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.isfinite(s[0]).all() and torch.isfinite(c[0]).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(x=torch.zeros(5)), "x must be 2-D"),
        (lambda a: a.update(x=torch.zeros(5, 3, dtype=torch.int64)), "x must be float"),
        (lambda a: a.update(y=torch.zeros(4, dtype=torch.int64)), "y has 4 labels"),
        (lambda a: a.update(y=torch.zeros(5)), "integer labels"),
        (lambda a: a.update(kind="cos"), "kind must be one of"),
        (lambda a: a.update(r=torch.zeros(6, 2), z=torch.zeros(6, dtype=torch.int64)), "r has dimension 2"),
        (lambda a: a.update(r=torch.zeros(6, 3)), "r and z must be given together"),
        (lambda a: a.update(r=torch.zeros(6, 3), z=torch.zeros(5, dtype=torch.int64)), "z has 5 labels"),
        (
            lambda a: a.update(r=torch.zeros(6, 3), z=torch.zeros(6, dtype=torch.int64), excl=torch.full((5,), 7)),
            "excl holds an index",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = dict(x=torch.zeros(5, 3), y=torch.zeros(5, dtype=torch.int64), r=None, z=None, excl=None, kind="l2")
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        blocked.triplet_stats_fwd(
            args["x"],
            args["y"],
            args["r"],
            args["z"],
            args["excl"],
            args["kind"],
            0.1,
            False,
            -INF,
            INF,
            0.0,
            INF,
            True,
        )
    with pytest.raises((ValueError, TypeError), match=match):
        blocked.row_extreme(
            args["x"], args["y"], args["r"], args["z"], args["excl"], args["kind"], "pos", "max", -INF, INF, None, ""
        )


def test_bad_miner_options_raise():
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="side"):
        blocked.row_extreme(x, y, None, None, None, "l2", "both", "max", -INF, INF, None, "")
    with pytest.raises(ValueError, match="mode"):
        blocked.row_extreme(x, y, None, None, None, "l2", "pos", "median", -INF, INF, None, "")
    with pytest.raises(ValueError, match="thr_op"):
        blocked.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, torch.zeros(4), "")
    with pytest.raises(ValueError, match="thr must be"):
        blocked.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, torch.zeros(3), "gt")


@pytest.mark.usefixtures("native_path")
def test_batch_hard_runs_are_bitwise_deterministic_and_unchanged_by_deterministic_mode():
    # row_hardest (square: the upper-triangle strips over several blocks; rectangular) and the chosen-triplet
    # loss with its gradient, twice, then again under torch.use_deterministic_algorithms(True)
    from fastdml.portable.chosen import chosen_triplet_stats_fwd

    x, y, r, z, excl = make_inputs(70, 9, torch.float32, False, seed=23)

    def run():
        with memory_budget(0.02):
            sq = blocked.row_hardest(x, y, None, None, None, "l2")
            rc = blocked.row_hardest(x, y, r, z, excl, "l2")
        valid = sq[2] & sq[5]
        ch = chosen_triplet_stats_fwd(x, valid, None, sq[1], sq[4], "l2", 0.2, False, -INF, INF, True)
        return [*sq, *rc, *ch]

    first = run()
    assert all(torch.equal(u, v) for u, v in zip(first, run()))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = run()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(u, v) for u, v in zip(first, det))

"""The second-generation GPU path, checked on the CPU: the fp32 precision setting and its near-duplicate
threshold (tf32 rounding emulated), column-split sweeps and their merge, budget-bounded staging, pair_list's
bounded writes, the device guard of every launch (mocked: no machine here has two GPUs), NaN rows."""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch
from fastdml.kernels import _common, _staged, contrastive, extreme, hardest, pairs, triplet

from fastdml import config
from fastdml import kernels as K
from tests.kernel_cases import DEVICE, INF, assert_close_scaled, make_inputs, needs_kernels, ref_call

# ----------------------------------------------------------------------------------------------------------
# the setting (no kernels)
# ----------------------------------------------------------------------------------------------------------


def test_fp32_precision_default_env_and_bad_values(monkeypatch):
    monkeypatch.delenv("FASTDML_FP32_PRECISION", raising=False)
    assert config.fp32_precision() == "ieee"
    for name in ("tf32x3", "tf32", "ieee", " TF32x3 "):
        monkeypatch.setenv("FASTDML_FP32_PRECISION", name)
        assert config.fp32_precision() == name.strip().lower()
    monkeypatch.setenv("FASTDML_FP32_PRECISION", "fp16")
    with pytest.raises(ValueError, match="FASTDML_FP32_PRECISION"):
        config.fp32_precision()
    with pytest.raises(ValueError, match="fp32_precision_override"):
        with config.fp32_precision_override("bf16"):
            pass


def test_fp32_precision_override_is_thread_local_and_nests(monkeypatch):
    monkeypatch.setenv("FASTDML_FP32_PRECISION", "tf32")
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = config.fp32_precision()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with config.fp32_precision_override("tf32x3"):
        with config.fp32_precision_override("ieee"):
            assert config.fp32_precision() == "ieee"
        assert config.fp32_precision() == "tf32x3"
        inside.set()
        release.wait(5)
    t.join(5)
    assert seen["other"] == "tf32", "another thread must not see this thread's override"
    assert config.fp32_precision() == "tf32"


def test_kernel_precision_resolution(monkeypatch):
    monkeypatch.delenv("FASTDML_FP32_PRECISION", raising=False)
    assert _common.precision() == "ieee"
    assert _common.precision(True) == "tf32" and _common.precision(False) == "ieee"
    with config.fp32_precision_override("tf32x3"):
        assert _common.precision() == "tf32x3"
        monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
        assert _common.precision() == "ieee", "ROCm always uses ieee"
        assert _common.precision(True) == "ieee"


# ----------------------------------------------------------------------------------------------------------
# the near-duplicate threshold under emulated tf32 rounding
# ----------------------------------------------------------------------------------------------------------


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to tf32 (10-bit mantissa), nearest with ties away from zero (cvt.rna.tf32.f32)."""
    b = t.contiguous().view(torch.int32)
    mag = (b & 0x7FFFFFFF) + 0x1000
    return ((b & ~0x7FFFFFFF) | (mag & ~0x1FFF)).view(torch.float32)


def _emulated_dot(x, r, prec):
    """x @ r.T as the tensor cores compute it for ``prec`` (products exact, fp32 sums)."""
    if prec == "ieee":
        return x @ r.T
    xh, rh = _tf32(x), _tf32(r)
    if prec == "tf32":
        return xh @ rh.T
    xl, rl = _tf32(x - xh), _tf32(r - rh)  # 3xTF32: the lo*lo product is dropped
    return xh @ rl.T + xl @ rh.T + xh @ rh.T


def _clusters(d, seed):
    """Pairs at every scale of q / s from ~1e-10 to ~1: cluster members at offsets 10^-6 .. 10^0."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(8, d, generator=g)
    pts = [c]
    for e in range(-6, 1):
        pts.append(c + (10.0**e) * torch.randn(8, d, generator=g))
    return torch.cat(pts).float()


@pytest.mark.parametrize("prec", ["ieee", "tf32x3", "tf32"])
@pytest.mark.parametrize("d", [16, 128, 512])
def test_near_threshold_keeps_q_accurate_under_emulated_rounding(prec, d):
    x = _clusters(d, seed=d)
    x64 = x.double()
    q_true = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    xn = (x * x).sum(1)
    s = xn[:, None] + xn[None, :]
    q = s - 2.0 * _emulated_dot(x, x, prec)
    f = _common.near_fraction(prec)
    near = q < f * s
    # what the kernel keeps: the direct differences (fp32, no tensor cores) where near, else the expansion
    q_direct = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    q_kernel = torch.where(near, q_direct, q).clamp_min(0).double()
    # the expansion's error per unit of s stays within the stated E_p
    e_p = _common.EXPANSION_ERROR[prec]
    assert float(((q.double() - q_true).abs() / s.double()).max()) <= e_p
    # far entries: relative error <= E_p / f (~1e-4 for ieee and tf32x3, ~2e-3 at tf32's cap)
    far = ~near
    rho = e_p / f
    rel = ((q_kernel - q_true).abs() / q_true.clamp_min(1e-300))[far]
    assert float(rel.max()) <= rho
    # near entries: direct differences, accurate to fp32 rounding of D squared differences
    rel_near = ((q_kernel - q_true).abs() / q_true.clamp_min(1e-30))[near & (q_true > 0)]
    assert float(rel_near.max()) <= 4 * d * 2.0**-24
    if prec == "tf32":
        # the derivation matters: with ieee's threshold tf32's far entries would be less accurate
        loose = (q >= 1e-2 * s) & (q_true > 0)
        worst = float(((q.double() - q_true).abs() / q_true.clamp_min(1e-300))[loose].max())
        assert worst > 2 * float(rel.max())


def test_near_fraction_per_precision():
    assert _common.near_fraction("ieee") == pytest.approx(1e-2)
    assert 1e-2 < _common.near_fraction("tf32x3") < 2e-2
    assert _common.near_fraction("tf32") == 0.5


# ----------------------------------------------------------------------------------------------------------
# launches: the setting reaches every kernel, every launch is under the device guard
# ----------------------------------------------------------------------------------------------------------

_LAUNCHING_MODULES = (hardest, extreme, pairs, contrastive, _staged, triplet)


class _Recorder:
    """Stands in for a jitted kernel: records (name, grid, PREC, NEAR, guard) and launches the real one."""

    def __init__(self, name, real, log, guard_state):
        self.name, self.real, self.log, self.guard_state = name, real, log, guard_state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, grid, kwargs.get("PREC"), kwargs.get("NEAR"), list(self.guard_state)))
            return self.real[grid](*args, **kwargs)

        return launch


def _instrument(monkeypatch):
    log, active = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for mod in _LAUNCHING_MODULES:
        monkeypatch.setattr(mod, "device_guard", guard)
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, _Recorder(name, getattr(mod, name), log, active))
    return log


def _every_launcher(x, y, r, z):
    return [
        lambda: K.contrastive_stats_fwd(x, y, r, z, None, "l2", 0.1, 1.0, -INF, INF, 0.0, INF, True),
        lambda: K.triplet_stats_fwd(x, y, r, z, None, "l2", 0.1, False, -INF, INF, 0.0, INF, True),
        lambda: K.semihard_stats_fwd(x, y, r, z, None, "l2", 0.1, True),
        lambda: K.row_extreme(x, y, r, z, None, "l2", "pos", "max", -INF, INF, None, ""),
        lambda: K.row_hardest(x, y, r, z, None, "l2"),
        lambda: K.pair_list(x, y, r, z, None, "l2", -INF, INF),
        lambda: K.triplet_list(x, y, r, z, None, "l2", -INF, INF),
    ]


@needs_kernels
@pytest.mark.parametrize("prec", ["tf32x3", "tf32"])
def test_every_launch_reads_the_setting_and_runs_under_the_device_guard(monkeypatch, prec):
    log = _instrument(monkeypatch)
    x, y, r, z, _ = make_inputs(20, 17, 8, "few", "rect", torch.float32, seed=1)
    with config.fp32_precision_override(prec):
        for call in _every_launcher(x, y, r, z):
            call()
    names = {entry[0] for entry in log}
    assert {
        "contrastive_kernel",
        "stage_dist_kernel",
        "wpass_kernel",
        "triplet_anchor_kernel",
        "semihard_anchor_kernel",
        "row_extreme_kernel",
        "row_hardest_kernel",
        "pair_list_kernel",
        "triplet_list_kernel",
    } <= names
    for name, _grid, p, near, guard in log:
        assert guard == [x.device], f"{name} launched outside the device guard of x's device"
        if name.endswith("anchor_kernel") or name == "triplet_list_kernel":
            continue  # read staged d' only: no dot
        assert p == prec, f"{name} got PREC={p}"
        assert near == _common.near_fraction(prec)


def test_device_guard_switches_to_the_tensor_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "a CPU tensor needs no CUDA guard"


# ----------------------------------------------------------------------------------------------------------
# column splits and their merge
# ----------------------------------------------------------------------------------------------------------


def test_merge_extremes_ties_nan_and_not_found():
    # 3 splits x 4 rows; row 0: tie across splits 1 and 2 -> split 1; row 1: NaN best -> first found split;
    # row 2: nothing found -> (0, 0, False); row 3: only split 2 found
    val = torch.tensor([[1.0, float("nan"), 0.0, 0.0], [5.0, 2.0, 0.0, 0.0], [5.0, 3.0, 0.0, 7.0]])
    idx = torch.tensor([[3, 1, 0, 0], [40, 41, 0, 0], [70, 72, 0, 80]])
    found = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.int8)
    v, i, f = _common.merge_extremes(val, idx, found, maximize=True)
    assert v[0] == 5.0 and i[0] == 40
    assert math.isnan(v[1]) and i[1] == 1 and f[1]
    assert not f[2] and v[2] == 0 and i[2] == 0
    assert v[3] == 7.0 and i[3] == 80
    v, i, f = _common.merge_extremes(val, idx, found, maximize=False)
    assert v[0] == 1.0 and i[0] == 3
    assert v[3] == 7.0 and i[3] == 80


def test_column_split_fills_the_target(monkeypatch):
    monkeypatch.setattr(_common, "target_ctas", lambda device: 264)
    cuda = torch.device("cuda")
    for rows, m, bn in ((64, 4096, 32), (128, 4096, 16), (2048, 65536, 32), (3, 50, 32)):
        s, span = _common.column_split(rows, m, bn, cuda)
        assert span % bn == 0 and (s - 1) * span < m <= s * span
        tiles = -(-m // bn)
        assert rows * s >= min(264, rows * tiles)


@needs_kernels
@pytest.mark.parametrize("target", [1, 10**6])
def test_split_sweeps_match_reference_with_ties(monkeypatch, target, tol):
    # references repeated exactly: extremes tie across column ranges; target 1: one range, 10**6: one per tile
    monkeypatch.setattr(_common, "target_ctas", lambda device: target)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, generator=g)
    r = base[torch.randint(0, 6, (150,), generator=g)].to(DEVICE)
    z = torch.randint(0, 3, (150,), generator=g).to(DEVICE)
    x = (base[torch.randint(0, 6, (40,), generator=g)] + 0.25).to(DEVICE)
    y = torch.randint(0, 3, (40,), generator=g).to(DEVICE)
    for side, mode in (("pos", "max"), ("neg", "min")):
        val, idx, found = K.row_extreme(x, y, r, z, None, "l2", side, mode, -INF, INF, None, "")
        (rv, ri, rf), _, _ = ref_call("row_extreme", x, y, r, z, None, "l2", side, mode, -INF, INF, None, "")
        assert torch.equal(found.cpu(), rf) and torch.equal(idx.cpu()[rf], ri[rf])
        assert_close_scaled(val, rv, tol[torch.float32], "value")
    got = K.row_hardest(x, y, r, z, None, "l2")
    (pv, pi, pf), _, _ = ref_call("row_extreme", x, y, r, z, None, "l2", "pos", "max", -INF, INF, None, "")
    (nv, ni, nf), _, _ = ref_call("row_extreme", x, y, r, z, None, "l2", "neg", "min", -INF, INF, None, "")
    assert torch.equal(got[1].cpu()[pf], pi[pf]) and torch.equal(got[4].cpu()[nf], ni[nf])
    lists = K.pair_list(x, y, r, z, None, "l2", 1.0, 2.0)
    want, _, _ = ref_call("pair_list", x, y, r, z, None, "l2", 1.0, 2.0)
    for a, b in zip(lists, want):
        assert torch.equal(a.cpu(), b)
    args = ("l2", 0.3, 1.5, -INF, INF, 0.0, INF)
    stats, gx, gr = K.contrastive_stats_fwd(x, y, r, z, None, *args, True)
    want, x64, r64 = ref_call("contrastive_stats", x, y, r, z, None, *args, grad=True)
    assert_close_scaled(stats, want.detach(), tol[torch.float32], "stats")
    assert stats[1] == want[1] and stats[3] == want[3], "counts are exact"
    gxs, grs = torch.autograd.grad(want[0], [x64, r64])
    assert_close_scaled(gx[0], gxs, tol[torch.float32], "dS+/dx")
    assert_close_scaled(gr[0], grs, tol[torch.float32], "dS+/dr")


@needs_kernels
def test_nan_row_keeps_found_indices_in_range():
    x, y, r, z, _ = make_inputs(40, 70, 4, "few", "rect", torch.float32, seed=3)
    x = x.clone()
    x[5] = float("nan")
    r = r.clone()
    r[9, 0] = float("nan")
    for target in (1, 10**6):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_common, "target_ctas", lambda device, t=target: t)
            pv, pi, pf, nv, ni, nf = K.row_hardest(x, y, r, z, None, "l2")
            for idx, found in ((pi, pf), (ni, nf)):
                assert ((idx[found] >= 0) & (idx[found] < r.shape[0])).all()
            assert pf[5] and nf[5], "row_hardest has no band: a NaN row is found, at an in-range index"
            val, idx, found = K.row_extreme(x, y, r, z, None, "l2", "neg", "min", -INF, INF, None, "")
            assert ((idx[found] >= 0) & (idx[found] < r.shape[0])).all()


# ----------------------------------------------------------------------------------------------------------
# pair_list: writes bounded by each (row, range) segment
# ----------------------------------------------------------------------------------------------------------


@needs_kernels
def test_pair_list_writes_stay_inside_short_segments():
    # counts one short per (row, range) (as if the count pass had seen one pair fewer): the write pass must
    # stop at each segment's end, so nothing lands past the allocated output or in a neighbour's segment
    x, y, r, z, excl = make_inputs(30, 45, 6, "few", "rect", torch.float32, seed=2)
    p = _common.prepare(x, y, r, z, excl, "l2")
    cfg = pairs.config(p.d)
    rows = -(-p.n // cfg["BM"])
    splits, span = _common.column_split(rows, p.m, cfg["BN"], p.device)
    common = dict(KIND=p.kind_id, PREC="ieee", UPCAST=p.upcast, NEAR=_common.near_fraction("ieee"), **cfg)
    cnt = torch.full((2, p.n, splits), -1, device=p.device, dtype=torch.int64)
    d = torch.empty(1, device=p.device, dtype=torch.int64)
    a = (p.x, p.r, p.xn, p.rn, p.y, p.z, p.excl)
    pairs.pair_list_kernel[(rows, splits)](*a, cnt, cnt, d, d, d, d, p.n, p.m, p.d, span, -INF, INF, 0, **common)
    short = (cnt - 1).clamp_min(0)
    flat = short.view(2, -1)
    off = (torch.cumsum(flat, 1) - flat).contiguous()
    tp, tn = (int(v) for v in flat.sum(1))
    guard = 64  # sentinel room after the allocated capacity
    outs = [torch.full((t + guard,), -7, device=p.device, dtype=torch.int64) for t in (tp, tp, tn, tn)]
    pairs.pair_list_kernel[(rows, splits)](*a, short, off, *outs, p.n, p.m, p.d, span, -INF, INF, 1, **common)
    for o, t in zip(outs, (tp, tp, tn, tn)):
        assert (o[t:] == -7).all(), "a write left the allocated capacity"
        assert (o[:t] >= 0).all(), "every slot of the capacity is written"
    # each (row, range) segment holds the first count - 1 pairs of that row and column range, in order
    want, _, _ = ref_call("pair_list", x, y, r, z, excl, "l2", -INF, INF)
    for k, (rows_w, cols_w) in enumerate(((want[0], want[1]), (want[2], want[3]))):
        exp_r, exp_c = [], []
        for i in range(p.n):
            for sid in range(splits):
                sel = (rows_w == i) & (cols_w >= sid * span) & (cols_w < (sid + 1) * span)
                keep = max(int(sel.sum()) - 1, 0)
                exp_r.append(rows_w[sel][:keep])
                exp_c.append(cols_w[sel][:keep])
        t = (tp, tn)[k]
        assert torch.equal(outs[2 * k][:t].cpu(), torch.cat(exp_r))
        assert torch.equal(outs[2 * k + 1][:t].cpu(), torch.cat(exp_c))


# ----------------------------------------------------------------------------------------------------------
# staging bounded by a budget independent of N
# ----------------------------------------------------------------------------------------------------------


def test_chunk_rows_follow_the_budget_without_a_floor():
    mb = 2**20
    assert _staged.chunk_rows(4096, 4096, True, 256 * mb) == 4096
    assert _staged.chunk_rows(65536, 65536, True, 256 * mb) == 512  # 65536 x 8 B per row
    assert _staged.chunk_rows(10**6, 10**6, True, 256 * mb) == 33  # no 64-row floor
    assert _staged.chunk_rows(100, 50, False, 1) == 1  # one row at least
    assert _staged.chunk_rows(100, 50, False, 3 * 50 * 4) == 3
    for n in (10**4, 10**5, 10**6):
        ch = _staged.chunk_rows(n, n, True, 256 * mb)
        assert ch * n * 8 <= 256 * mb, "the staging buffers stay under the budget"


def test_stage_budget_default_and_env(monkeypatch):
    monkeypatch.delenv("FASTDML_TRITON_STAGE_MB", raising=False)
    assert _staged.stage_bytes() == 256 * 2**20
    monkeypatch.setenv("FASTDML_TRITON_STAGE_MB", "0.5")
    assert _staged.stage_bytes() == 2**19
    monkeypatch.setenv("FASTDML_TRITON_STAGE_MB", "lots")
    with pytest.raises(ValueError, match="FASTDML_TRITON_STAGE_MB"):
        _staged.stage_bytes()


@needs_kernels
@pytest.mark.parametrize("max_one_block", [1024, 4])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_triplet_ops_with_small_budgets(monkeypatch, rows_per_chunk, max_one_block, tol):
    # max_one_block 1024: one positive block, W written by plain stores; 4: positive blocks in turn, W also by
    # plain stores. The staging buffers come NaN-filled (spy): every entry read must have been written.
    n, m, d = 23, 31, 5
    x, y, r, z, excl = make_inputs(n, m, d, "few", "excl", torch.float32, seed=rows_per_chunk)
    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [rows_per_chunk * m * 8])
    monkeypatch.setattr(_staged, "MAX_ONE_BLOCK", max_one_block)
    allocated = []
    real_empty = torch.empty

    def spy_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        allocated.append(t.numel() * t.element_size())
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(_staged.torch, "empty", spy_empty)
    args = ("l2", 0.2, False, -INF, INF, 0.0, INF)
    stats, gx, gr = K.triplet_stats_fwd(x, y, r, z, excl, *args, True)
    monkeypatch.setattr(_staged.torch, "empty", real_empty)
    assert max(allocated) <= rows_per_chunk * m * 4, "a staging buffer beyond the budget"
    want, x64, r64 = ref_call("triplet_stats", x, y, r, z, excl, *args, grad=True)
    assert_close_scaled(stats, want.detach(), tol[torch.float32], "stats")
    gxs, grs = torch.autograd.grad(want[0], [x64, r64])
    assert_close_scaled(gx[0], gxs, tol[torch.float32], "dS/dx")
    assert_close_scaled(gr[0], grs, tol[torch.float32], "dS/dr")
    monkeypatch.setattr(_staged.torch, "empty", spy_empty)
    stats, gx, _ = K.semihard_stats_fwd(x, y, None, None, None, "l2", 0.2, True)
    monkeypatch.setattr(_staged.torch, "empty", real_empty)
    want, x64, _ = ref_call("semihard_stats", x, y, None, None, None, "l2", 0.2, grad=True)
    assert_close_scaled(stats, want.detach(), tol[torch.float32], "semihard stats")
    (g,) = torch.autograd.grad(want[0], [x64])
    assert_close_scaled(gx[0], g, tol[torch.float32], "semihard dS/dx")


@needs_kernels
@pytest.mark.parametrize("op", ["contrastive", "triplet", "semihard", "row_hardest", "row_extreme", "pair_list"])
def test_memory_prediction_bounds_the_kernel_allocations(monkeypatch, op):
    from fastdml.kernels import memory

    n, d = 90, 16
    x, y, _, _, _ = make_inputs(n, 0, d, "few", "square", torch.float32, seed=4)
    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [40 * n * 8])
    total = [0]
    real = {name: getattr(torch, name) for name in ("empty", "full", "zeros", "empty_like", "zeros_like")}

    def spy(name):
        def alloc(*args, **kw):
            t = real[name](*args, **kw)
            total[0] += t.numel() * t.element_size()
            return t

        return alloc

    calls = {
        "contrastive": lambda: K.contrastive_stats_fwd(
            x, y, None, None, None, "l2", 0.1, 1.0, -INF, INF, 0.0, INF, True
        ),
        "triplet": lambda: K.triplet_stats_fwd(x, y, None, None, None, "l2", 0.1, False, -INF, INF, 0.0, INF, True),
        "semihard": lambda: K.semihard_stats_fwd(x, y, None, None, None, "l2", 0.1, True),
        "row_hardest": lambda: K.row_hardest(x, y, None, None, None, "l2"),
        "row_extreme": lambda: K.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, None, ""),
        "pair_list": lambda: K.pair_list(x, y, None, None, None, "l2", 0.5, 1.0),
    }
    for name in real:
        monkeypatch.setattr(torch, name, spy(name))
    out = calls[op]()
    for name, fn in real.items():
        monkeypatch.setattr(torch, name, fn)
    if op == "pair_list":  # the output lists are the caller's, not in the prediction
        total[0] -= sum(max(1, t.numel()) * 8 for t in out)
    predicted = memory.predicted_extra_bytes(op, n, n, d, need_grad=True, device=x.device)
    assert 0 < total[0] <= predicted


@needs_kernels
def test_autotune_times_each_candidate_once_per_key_and_keeps_results(monkeypatch, tol):
    # the CUDA branch of autotuned, driven on the CPU: three candidates with made-up times (the second
    # fastest); each is launched by the timer, the pick is cached per key, results match the reference
    cands = [dict(BM=32, BN=32, BK=16, SUBK=16, num_warps=4), dict(BM=16, BN=16, BK=16, SUBK=16, num_warps=4)]
    cands.append(dict(BM=64, BN=32, BK=16, SUBK=16, num_warps=4))
    fake_ms = {32: 3.0, 16: 1.0, 64: 2.0}
    timed = []

    def fake_time(run, device):
        timed.append(run())
        return fake_ms[cands[len(timed) - 1 if len(timed) <= 3 else 0]["BM"]]

    monkeypatch.setattr(_common, "_can_tune", lambda device: True)
    monkeypatch.setattr(_common, "_time_candidate", fake_time)
    monkeypatch.setattr(_common, "extreme_configs", lambda d, *a: [dict(c) for c in cands])
    monkeypatch.setattr(extreme, "extreme_configs", lambda d, *a: [dict(c) for c in cands])
    monkeypatch.setattr(_common, "_TUNED", {})
    x, y, r, z, excl = make_inputs(40, 33, 6, "few", "rect", torch.float32, seed=9)
    for _ in range(2):
        val, idx, found = K.row_extreme(x, y, r, z, excl, "l2", "neg", "min", -INF, INF, None, "")
        (rv, ri, rf), _, _ = ref_call("row_extreme", x, y, r, z, excl, "l2", "neg", "min", -INF, INF, None, "")
        assert torch.equal(found.cpu(), rf) and torch.equal(idx.cpu()[rf], ri[rf])
        assert_close_scaled(val, rv, tol[torch.float32], "value")
    assert len(timed) == 3, "each candidate timed once, on the first call of the key only"
    (choice,) = _common._TUNED.values()
    assert cands[choice]["BM"] == 16, "the fastest candidate is kept"
    # another key (another kind) is tuned separately
    K.row_extreme(x, y, r, z, excl, "dot", "neg", "min", -INF, INF, None, "")
    assert len(timed) == 6 and len(_common._TUNED) == 2


def _cuda_candidates(monkeypatch, d, dtype):
    """Every distinct CUDA autotune candidate of the row sweeps for D = d and ``dtype``, over the precisions."""
    with monkeypatch.context() as m:
        m.setattr(_common, "interpreting", lambda: False)
        lists = [_common.extreme_configs(d, dtype, prec) for prec in _common.PRECISIONS]
    seen = []
    for c in (c for lst in lists for c in lst):
        if c not in seen:
            seen.append(c)
    return seen


@needs_kernels
@pytest.mark.parametrize("d", [3, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_autotune_candidate_matches_the_reference(monkeypatch, d, dtype, tol):
    # each CUDA candidate config of the D bucket (run here under the interpreter, one at a time): found
    # flags exact, values within the dtype's tolerance, each pick's float64 d' within BOUND of the row's best
    # (fp32 rounding of d' on rows of norm ~sqrt(D), the values below ~2 sqrt(D): 1e-5 relative)
    cands = _cuda_candidates(monkeypatch, d, dtype)
    assert len(cands) >= 2, f"D = {d}, {dtype}: a second candidate"
    x, y, r, z, excl = make_inputs(45, 37, d, "few", "excl", dtype, seed=d)
    x64, r64 = x.cpu().double(), r.cpu().double()
    dm = torch.cdist(x64, r64)
    bound = 1e-5 * float(dm.max())
    same = y.cpu()[:, None] == z.cpu()[None, :]
    ok = torch.ones_like(same)
    keep = excl.cpu() >= 0
    ok[keep.nonzero()[:, 0], excl.cpu()[keep]] = False
    for cand in cands:
        monkeypatch.setattr(extreme, "extreme_configs", lambda *a, c=cand: [dict(c)])
        monkeypatch.setattr(hardest, "extreme_configs", lambda *a, c=cand: [dict(c)])
        got = K.row_hardest(x, y, r, z, excl, "l2")
        for (val, idx, found), elig, maximize in ((got[:3], same & ok, True), (got[3:], ~same & ok, False)):
            fill = -INF if maximize else INF
            d_el = torch.where(elig, dm, torch.full_like(dm, fill))
            best = d_el.amax(1) if maximize else d_el.amin(1)
            assert torch.equal(found.cpu(), elig.any(1)), f"{cand}: found flags"
            f = found.cpu()
            pick = d_el[torch.arange(45)[f], idx.cpu()[f]]
            gap = (best[f] - pick) if maximize else (pick - best[f])
            assert float(gap.max()) <= bound, f"{cand}: a pick {float(gap.max())} from the best"
            assert_close_scaled(val.cpu()[f], best[f], tol[dtype], f"{cand}: values")
        val, idx, found = K.row_extreme(x, y, r, z, excl, "l2", "neg", "max", -INF, INF, None, "")
        d_el = torch.where(~same & ok, dm, torch.full_like(dm, -INF))
        assert torch.equal(found.cpu(), (~same & ok).any(1))
        assert_close_scaled(val.cpu()[found.cpu()], d_el.amax(1)[found.cpu()], tol[dtype], f"{cand}: row_extreme")

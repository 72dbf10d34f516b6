"""CUDA-only checks of the compiled kernels (run by bench/gpu_check.sh): determinism, large N, tf32 opt-in.

The interpreter cannot show these: it runs programs one after another (so it is trivially deterministic),
it cannot reach N = 65,536 in test time, and it ignores ``input_precision``.
"""

import pytest
import torch

from fastdml import kernels as K
from fastdml import reference as ref
from tests.kernel_cases import INF, assert_close_scaled, cuda_only, labels, near_duplicates

pytestmark = [pytest.mark.cuda, cuda_only]


def _inputs(n, d, pattern="pk", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = labels(pattern, n, g)
    return x.cuda(), y.cuda()


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_kernels_are_bitwise_deterministic(kind):
    x, y = _inputs(3000, 64, "few")
    calls = [
        lambda: K.contrastive_stats_fwd(x, y, None, None, None, kind, 0.5, 12.0, -INF, INF, 0.0, INF, True),
        lambda: K.contrastive_stats_fwd(x[:1000], y[:1000], x, y, None, kind, 0.5, 12.0, -INF, INF, 0.0, INF, True),
        lambda: K.triplet_stats_fwd(x[:700], y[:700], None, None, None, kind, 0.3, False, -INF, INF, 0.0, INF, True),
        lambda: K.semihard_stats_fwd(x[:700], y[:700], None, None, None, kind, 0.3, True),
        lambda: K.row_extreme(x, y, None, None, None, kind, "neg", "min", -INF, INF, None, ""),
    ]
    for call in calls:
        a, b = call(), call()
        for u, v in zip(a, b):
            assert torch.equal(u, v), "two runs differ"


def test_contrastive_and_row_extreme_at_n_65536():
    n, d = 65536, 32
    x, y = _inputs(n, d, "pk")
    x = torch.nn.functional.normalize(x, dim=1)
    stats, _, _ = K.contrastive_stats_fwd(x, y, None, None, None, "l2", 0.0, 1.0, -INF, INF, 0.0, INF, False)
    val, idx, found = K.row_extreme(x, y, None, None, None, "l2", "pos", "max", -INF, INF, None, "")
    # the square case equals the rectangular one with the diagonal excluded: check it slab by slab
    want = torch.zeros(4, dtype=torch.float64)
    x64 = x.double()
    for a in range(0, n, 4096):
        rows = torch.arange(a, min(n, a + 4096), device=x.device)
        want += ref.contrastive_stats(x64[rows], y[rows], x64, y, rows, "l2", 0.0, 1.0, -INF, INF, 0.0, INF).cpu()
        if a == 0:
            rv, ri, rf = ref.row_extreme(x64[rows], y[rows], x64, y, rows, "l2", "pos", "max", -INF, INF, None, "")
            assert torch.equal(found[rows].cpu(), rf.cpu())
            assert torch.equal(idx[rows][rf].cpu(), ri[rf].cpu())
    assert_close_scaled(stats, want, dict(atol=1e-5, rtol=1e-4), "stats at N = 65536")
    assert want[1] == stats[1].cpu() and want[3] == stats[3].cpu(), "counts must be exact (int64)"


def test_triplet_ops_at_n_1024_across_chunks(monkeypatch):
    # a 512 KB staging budget: 64-row anchor chunks, so the column-side gradient is summed over 16 launches.
    # (N = 1024: the float64 reference keeps its (1, N, N) triplet blocks for autograd, ~30 GB here; at
    # N = 2048 it would need ~250 GB)
    from fastdml.kernels import _staged

    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [2**19])
    n, d = 1024, 32
    x, y = _inputs(n, d, "few")
    for name, fn, args in (
        ("triplet_stats", K.triplet_stats_fwd, (0.2, False, -INF, INF, 0.0, INF)),
        ("semihard_stats", K.semihard_stats_fwd, (0.2,)),
    ):
        stats, gx, _ = fn(x, y, None, None, None, "l2", *args, True)
        x64 = x.double().requires_grad_(True)
        want = getattr(ref, name)(x64, y, None, None, None, "l2", *args)
        (g,) = torch.autograd.grad(want[0], [x64])
        assert_close_scaled(stats, want.detach(), dict(atol=1e-5, rtol=1e-4), f"{name} stats")
        assert_close_scaled(gx[0], g, dict(atol=1e-5, rtol=1e-4), f"{name} gradient")


def test_tf32_is_opt_in_and_ieee_is_exact_enough():
    # with ieee fp32 the near-duplicate distances match float64; tf32 (opt-in) is allowed to be worse
    x, y = near_duplicates(1024, 3, torch.float32)
    args = (1e-3, 5e-3, -INF, INF, 0.0, INF)
    stats, _, _ = K.contrastive_stats_fwd(x, y, None, None, None, "l2", *args, False)
    want = ref.contrastive_stats(x.double(), y, None, None, None, "l2", *args)
    assert_close_scaled(stats, want, dict(atol=1e-5, rtol=1e-4), "ieee stats")
    stats32, _, _ = K.contrastive_stats_fwd(x, y, None, None, None, "l2", *args, False, allow_tf32=True)
    assert torch.isfinite(stats32).all()

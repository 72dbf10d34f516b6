"""CUDA-only checks of the compiled kernels (run by bench/gpu_check.sh): determinism, large N, precisions.

The interpreter cannot show these: it runs programs one after another (so it is trivially deterministic),
it cannot reach N = 65,536 in test time, and it ignores ``input_precision``.

Oracles that survive real rounding: at these sizes an fp32 selection (an argmin, a threshold, a count) may
legitimately differ from the float64 reference where two candidates lie within the fp32 error of d'. A pick
is accepted where its float64 d' is within ``BOUND`` of the reference's best; counts may differ by the
number of pairs within ``BOUND`` of the threshold; values are continuous at a flip and compared as usual;
gradients jump at a flip, so only the rows of flipped selections may differ.
"""

import pytest
import torch

from fastdml import config
from fastdml import kernels as K
from fastdml import reference as ref
from tests.kernel_cases import INF, assert_close_scaled, cuda_only, labels, near_duplicates

pytestmark = [pytest.mark.cuda, cuda_only]

# fp32 error of d' on unit-norm rows (|d'| <= 2): the far entries' relative error of q, 1e-4
# (kernels/_common.near_fraction), halves for d = sqrt(q); the near entries are within D u32. With margin:
BOUND = 2e-4


def _picks_within_bound(idx, found, d64, maximize, bound=BOUND):
    """The kernel's picks against the float64 matrix ``d64`` (rows: queries, columns: references, non-eligible
    entries +-inf): each found pick is eligible and within ``bound`` of the row's best."""
    fill = float("-inf") if maximize else float("inf")
    best = d64.max(1).values if maximize else d64.min(1).values
    want_found = best != fill
    assert torch.equal(found.cpu(), want_found.cpu()), "found flags differ"
    got = d64[torch.arange(d64.shape[0], device=d64.device), idx.clamp(0, d64.shape[1] - 1)]
    gap = (best - got) if maximize else (got - best)
    assert (got[found] != fill).all(), "a pick is not an eligible reference"
    assert float(gap[found].max()) <= bound, f"a pick is {float(gap[found].max())} from the best"


def _inputs(n, d, pattern="pk", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = labels(pattern, n, g)
    return x.cuda(), y.cuda()


@pytest.mark.parametrize("kind", ["l2", "dot"])
def test_kernels_are_bitwise_deterministic(kind):
    x, y = _inputs(3000, 64, "few")
    calls = [
        # the square gradient's atomic (upper-triangle) mode: tests/test_kernels_contrastive.py
        lambda: K.contrastive_stats_fwd(
            x, y, None, None, None, kind, 0.5, 12.0, -INF, INF, 0.0, INF, True, deterministic=True
        ),
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
    near_thr = 0  # negative pairs with d' within BOUND of the threshold 1 (their count may flip)
    x64 = x.double()
    for a in range(0, n, 4096):
        rows = torch.arange(a, min(n, a + 4096), device=x.device)
        want += ref.contrastive_stats(x64[rows], y[rows], x64, y, rows, "l2", 0.0, 1.0, -INF, INF, 0.0, INF).cpu()
        dm = torch.cdist(x64[rows], x64)
        neg = y[rows][:, None] != y[None, :]
        near_thr += int(((dm - 1.0).abs() <= BOUND)[neg].sum())
        if a == 0:
            pos = (y[rows][:, None] == y[None, :]) & (rows[:, None] != torch.arange(n, device=x.device)[None, :])
            _picks_within_bound(idx[rows], found[rows], torch.where(pos, dm, float("-inf")), True)
    assert_close_scaled(stats, want, dict(atol=1e-5, rtol=1e-4), "stats at N = 65536")
    assert stats[1].cpu() == want[1], "no positive pair is counted differently (no threshold on them)"
    assert abs(float(stats[3].cpu() - want[3])) <= near_thr, "count flips beyond the pairs at the threshold"


def test_triplet_ops_at_n_1024_across_chunks(monkeypatch):
    # a 512 KB staging budget: 64-row anchor chunks, so the column-side gradient is summed over 16 launches.
    # (N = 1024: the float64 reference keeps its (1, N, N) triplet blocks for autograd, ~30 GB here; at
    # N = 2048 it would need ~250 GB)
    from fastdml.kernels import _staged

    monkeypatch.setattr(_staged, "_STAGE_OVERRIDE", [2**19])
    n, d = 1024, 32
    x, y = _inputs(n, d, "few")
    for name, fn, args, selection in (
        ("triplet_stats", K.triplet_stats_fwd, (0.2, False, -INF, INF, 0.0, INF), False),
        ("semihard_stats", K.semihard_stats_fwd, (0.2,), True),
    ):
        stats, gx, _ = fn(x, y, None, None, None, "l2", *args, True)
        x64 = x.double().requires_grad_(True)
        want = getattr(ref, name)(x64, y, None, None, None, "l2", *args)
        (g,) = torch.autograd.grad(want[0], [x64])
        # S is continuous where n* flips between two negatives within BOUND: compared as usual
        assert_close_scaled(stats, want.detach(), dict(atol=1e-5, rtol=1e-4), f"{name} stats")
        got, g = gx[0].double().cpu(), g.cpu()
        off = ((got - g).abs() > 1e-5 * max(1.0, float(g.abs().max())) + 1e-4 * g.abs()).any(1)
        # a flipped n* moves the gradient of its anchor, the old and the new negative: semi-hard may differ
        # in a few rows (about 40 of 261,618 choices flip at this size), batch-all in none
        assert int(off.sum()) <= (3 * 64 if selection else 0), f"{name}: {int(off.sum())} gradient rows off"


@pytest.mark.parametrize("prec", ["ieee", "tf32x3"])
def test_fp32_parity_tolerances_per_precision(prec):
    # the decision for the default: tf32x3 must meet the same fp32 tolerances as ieee (values, gradients,
    # row_hardest picks within BOUND), at N = 2048, D = 128, unit-norm rows
    x, y = _inputs(2048, 128, "few", seed=3)
    x = torch.nn.functional.normalize(x, dim=1)
    x64 = x.double().requires_grad_(True)
    args = ("l2", 0.2, 0.8, -INF, INF, 0.0, INF)
    with config.fp32_precision_override(prec):
        stats, gx, _ = K.contrastive_stats_fwd(x, y, None, None, None, *args, True)
        pv, pi, pf, nv, ni, nf = K.row_hardest(x, y, None, None, None, "l2")
    want = ref.contrastive_stats(x64, y, None, None, None, *args)
    g = torch.autograd.grad(want[0] + 0.7 * want[2], [x64])[0]
    assert_close_scaled(stats[[0, 2]], want.detach()[[0, 2]], dict(atol=1e-5, rtol=1e-4), f"{prec} sums")
    assert_close_scaled(gx[0] + 0.7 * gx[1], g, dict(atol=1e-5, rtol=1e-4), f"{prec} gradient")
    dm = torch.cdist(x64.detach(), x64.detach())
    eye = torch.eye(2048, dtype=torch.bool, device=x.device)
    same = (y[:, None] == y[None, :]) & ~eye
    _picks_within_bound(pi, pf, torch.where(same, dm, float("-inf")), True)
    _picks_within_bound(ni, nf, torch.where(~same & ~eye, dm, float("inf")), False)


def test_tf32_is_opt_in_and_ieee_is_exact_enough():
    # with ieee fp32 the near-duplicate distances match float64; tf32 (opt-in) is allowed to be worse
    x, y = near_duplicates(1024, 3, torch.float32)
    args = (1e-3, 5e-3, -INF, INF, 0.0, INF)
    stats, _, _ = K.contrastive_stats_fwd(x, y, None, None, None, "l2", *args, False)
    want = ref.contrastive_stats(x.double(), y, None, None, None, "l2", *args)
    assert_close_scaled(stats, want, dict(atol=1e-5, rtol=1e-4), "ieee stats")
    stats32, _, _ = K.contrastive_stats_fwd(x, y, None, None, None, "l2", *args, False, allow_tf32=True)
    assert torch.isfinite(stats32).all()

"""The routing rules of ``fastdml.dispatch`` beyond the requested backend: float64, portable ops, non-finite
input, the compiled C helpers."""

import importlib
import math

import torch

import fastdml
from fastdml import dispatch, portable
from fastdml.blocked import native


def test_float64_on_the_kernels_runs_blocked():
    x64, x32 = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2)
    with fastdml.use_backend("triton"):
        assert dispatch.module_for(x64).__name__ == "fastdml.blocked"
        assert dispatch.module_for(x32).__name__ == "fastdml.kernels"
    with fastdml.use_backend("reference"):
        # a compiled call never reaches the reference: inside the custom op the blocked path runs
        assert dispatch.module_for(x32).__name__ == "fastdml.blocked"


def test_portable_ops_serve_every_backend():
    x = torch.zeros(3, 2)
    for backend, module in (("blocked", "fastdml.blocked"), ("triton", "fastdml.kernels")):
        with fastdml.use_backend(backend):
            assert dispatch.implementation(x, "pair_values") is portable.pair_values
            assert dispatch.implementation(x, "chosen_triplet_stats_fwd") is portable.chosen_triplet_stats_fwd
            assert dispatch.implementation(x, "row_hardest").__module__.startswith(module)


def test_reference_is_called_directly_only_eagerly():
    x = torch.zeros(3, 2)
    with fastdml.use_backend("reference"):
        assert dispatch.use_reference(x)
    with fastdml.use_backend("blocked"):
        assert not dispatch.use_reference(x)


def test_nonfinite_stats_come_from_the_reference():
    x = torch.randn(4, 3)
    assert not dispatch.stats_from_reference(x, None)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[2, 1] = bad
        assert dispatch.stats_from_reference(y, None)
        assert dispatch.stats_from_reference(x, y)
    big = torch.full((4, 3), 6e4, dtype=torch.float16)  # the sum overflows, every entry is finite
    assert not dispatch.stats_from_reference(big, None)


def test_native_helpers_follow_device_dtype_and_the_switch():
    cpu = torch.device("cpu")
    assert not dispatch.native_helpers(cpu, torch.float16)
    assert not dispatch.native_helpers(torch.device("meta"), torch.float32)
    with native.disabled():
        assert not dispatch.native_helpers(cpu, torch.float32)
    assert dispatch.native_helpers(cpu, torch.float32) == native.enabled()


def test_kernels_inside_a_compiled_graph_follow_the_nan_rule():
    # a compiled call reaches the backend without the eager check: the kernels' entry points carry the same
    # rule as the blocked ops (NaN rows: the reference's picks and stats)
    from fastdml import reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g)
    x[4] = math.nan
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
    with fastdml.use_backend("triton"):
        hardest = dispatch.implementation(x, "row_hardest")
        stats_fwd = dispatch.implementation(x, "contrastive_stats_fwd")
    assert hardest is not importlib.import_module("fastdml.kernels").row_hardest
    got = hardest(x, y, None, None, None, "l2")
    want = reference.row_hardest(x, y, None, None, None, "l2")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    args = (x, y, None, None, None, "l2", 0.0, 1.0, -math.inf, math.inf, -math.inf, math.inf)
    stats, gx, _ = stats_fwd(*args, True, need_grad_r=False)
    ref = reference.contrastive_stats(*args)
    assert torch.equal(stats.isnan(), ref.to(stats.dtype).isnan())
    torch.testing.assert_close(stats[~stats.isnan()], ref.to(stats.dtype)[~stats.isnan()])
    assert gx.shape == (2, 9, 4)

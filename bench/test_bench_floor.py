"""Benchmark: the GEMM floor, ``torch.mm(X, X.T)`` forward+backward at each benchmarked shape.

Every pairwise loss needs at least the distance GEMM (2 N^2 D flops) forward and the same again backward,
so this is the floor the report divides each case's time by. Only its forward+backward is timed.
"""

import time

import pytest
import torch

from bench import _cases
from bench._runner import choose_rounds


def test_gemm_floor(floor_shape, benchmark, bench_session):
    n, d, dtype, device = floor_shape
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=_cases.DTYPES[dtype]).requires_grad_(True)
    upstream = torch.randn(n, n, generator=g).to(device=device, dtype=x.dtype)
    cuda = x.is_cuda

    def step():
        x.grad = None
        out = torch.mm(x, x.T)
        out.backward(upstream)
        if cuda:
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    # d/dX of <G, X X^T> is (G + G^T) X: the benchmark computes the real thing
    expected = (upstream + upstream.T) @ x.detach()
    tol = 1e-3 if dtype in ("float32", "float64") else 5e-2
    assert torch.allclose(x.grad, expected, rtol=tol, atol=tol * max(1.0, float(expected.abs().max())))
    del out
    benchmark.group = f"gemm_floor/N{n}/D{d}/{dtype}/{device}"
    benchmark.extra_info.update(
        {
            "kind": "gemm_floor",
            "n": n,
            "d": d,
            "dtype": dtype,
            "device": device,
            "machine": _cases.machine(device),
            "versions": _cases.versions(),
        }
    )
    rounds = choose_rounds(first, bench_session.opts.target_s, bench_session.opts.max_rounds)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

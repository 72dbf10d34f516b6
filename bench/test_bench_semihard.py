"""Benchmark: the semihard loss family (cases in bench/_cases.py, run by bench/_runner.py)."""

from bench._runner import run_case

FAMILY = "semihard"


def test_semihard(case, benchmark, bench_session):
    run_case(case, benchmark, bench_session)

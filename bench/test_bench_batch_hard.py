"""Benchmark: the batch_hard loss family (cases in bench/_cases.py, run by bench/_runner.py)."""

from bench._runner import run_case

FAMILY = "batch_hard"


def test_batch_hard(case, benchmark, bench_session):
    run_case(case, benchmark, bench_session)

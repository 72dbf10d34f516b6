"""Benchmark: the all_triplets loss family (cases in bench/_cases.py, run by bench/_runner.py)."""

from bench._runner import run_case

FAMILY = "all_triplets"


def test_all_triplets(case, benchmark, bench_session):
    run_case(case, benchmark, bench_session)

"""Benchmark: the contrastive loss family (cases in bench/_cases.py, run by bench/_runner.py)."""

from bench._runner import run_case

FAMILY = "contrastive"


def test_contrastive(case, benchmark, bench_session):
    run_case(case, benchmark, bench_session)

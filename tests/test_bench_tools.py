"""The benchmark scripts outside the suites import, and the calibration measures a positive cost."""

import importlib

import pytest

from bench import calibrate


@pytest.mark.parametrize("name", ["distributed", "faults", "idle", "native", "spread"])
def test_experiment_scripts_import_and_have_a_main(name):
    module = importlib.import_module(f"bench.experiments.{name}")
    assert callable(module.main)


def test_calibration_measures_a_positive_cost_per_unit_of_work():
    got = calibrate.seconds_per_work("fastdml", False, n=32, d=8, calls=1)
    assert 0 < got < float("inf")

"""examples/train_mnist.py runs end to end on a few hundred images and learns something."""

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mnist.py"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE), run_name="example")  # defines main() without running it


def test_example_trains_and_evaluates_on_a_few_hundred_images(example, capsys):
    metrics = example["main"](["--train", "600", "--test", "300", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "epoch 1: mean loss" in out and "epoch 2: mean loss" in out and "precision_at_1" in out
    assert set(metrics) == {"precision_at_1", "r_precision", "mean_average_precision_at_r"}
    # ten digits at random give precision@1 near 10 %; two short epochs already separate them
    assert metrics["precision_at_1"] > 0.4, metrics


def test_example_is_short_enough_to_copy():
    assert len(EXAMPLE.read_text().splitlines()) <= 110

"""Smoke runs of the MNIST demo on a few hundred images: outputs exist and are valid; the CLI is documented."""

import json

import numpy as np
import pytest
import torch

from fastdml.demo.__main__ import build_parser, main
from fastdml.demo.sampler import PKSampler, RandomSampler

SMALL = [
    "--train-subset",
    "300",
    "--test-subset",
    "200",
    "--epochs",
    "1",
    "--classes-per-batch",
    "10",
    "--samples-per-class",
    "6",
    "--no-progress",
    "--device",
    "cpu",
]


def _read_png(path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg

    image = mpimg.imread(path)  # raises on a file that is not a decodable PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas
    return image


@pytest.mark.parametrize(
    "loss, mining", [("contrastive", None), ("triplet", None), ("triplet", "semi-hard"), ("paired-contrastive", None)]
)
def test_demo_smoke_run_writes_valid_outputs(tmp_path, capsys, loss, mining):
    out = tmp_path / "run"
    argv = SMALL + ["--loss", loss, "--out", str(out)] + (["--mining", mining] if mining else [])
    assert main(argv) == 0
    for name in ("embedding.png", "loss.png", "metrics.json", "model.pt"):
        assert (out / name).is_file(), name
    _read_png(out / "embedding.png")
    _read_png(out / "loss.png")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("precision_at_1", "r_precision", "mean_average_precision_at_r", "knn_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["train_seconds"] > 0 and metrics["epochs"] == 1
    assert metrics["loss"] == loss and metrics["device"] == "cpu"
    assert metrics["mining"] == (mining or build_parser().parse_args(["--loss", loss]).mining or metrics["mining"])
    state = torch.load(out / "model.pt", weights_only=False)
    assert state["state_dict"] and state["metrics"]["loss"] == loss
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "P@1" in last and "MAP@R" in last and str(out) in last


def test_demo_is_deterministic_given_the_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert main(SMALL + ["--seed", "3", "--out", str(tmp_path / name)]) == 0
        runs.append(torch.load(tmp_path / name / "model.pt", weights_only=False)["state_dict"])
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_help_documents_every_option(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss", "contrastive", "--mining", "semi-hard"], "mining"),
        (["--loss", "quadruplet"], "invalid choice"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--loss", "paired-contrastive", "--positive-weight", "1.5"], "positive_weight"),
    ],
)
def test_bad_options_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_files_exit_with_the_file_named(tmp_path, capsys):
    assert main(SMALL + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "train-images-idx3-ubyte: not found in --data-dir" in capsys.readouterr().err


def test_pk_sampler_batches_hold_k_of_p_distinct_classes_and_are_reproducible():
    labels = np.repeat(np.arange(10), [5, 50, 7, 30, 30, 30, 30, 30, 30, 30])
    batches = list(PKSampler(labels, p=4, k=6, seed=1))
    assert len(batches) == len(labels) // 24
    for batch in batches:
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and (counts == 6).all()
    again = list(PKSampler(labels, p=4, k=6, seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    # a small class (5 members, k = 6) still yields k samples: its queue is reshuffled and reused
    small = [b for b in batches if (labels[b] == 0).any()]
    assert all((labels[b] == 0).sum() == 6 for b in small)


def test_random_sampler_covers_the_data_once_per_epoch():
    batches = list(RandomSampler(100, 10, seed=0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))

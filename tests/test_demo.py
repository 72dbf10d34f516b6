"""Smoke runs of the MNIST demo on a few hundred images: outputs exist and are valid; the CLI is documented."""

import json

import numpy as np
import pytest
import torch

from fastdml.demo.__main__ import build_parser, main, snapshot_epochs
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
    "loss, mining",
    [
        ("contrastive", None),
        ("triplet", None),
        ("triplet", "semi-hard"),
        ("paired-contrastive", None),
        ("paired-contrastive", "none"),
    ],
)
def test_demo_smoke_run_writes_valid_outputs(tmp_path, capsys, loss, mining):
    out = tmp_path / "run"
    argv = SMALL + ["--loss", loss, "--out", str(out)] + (["--mining", mining] if mining else [])
    assert main(argv) == 0
    for name in ("embedding.png", "progress.png", "loss.png", "metrics.json", "model.pt"):
        assert (out / name).is_file(), name
    _read_png(out / "embedding.png")
    _read_png(out / "progress.png")
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


@pytest.mark.parametrize("dim", [1, 3])
def test_demo_draws_1d_and_3d_embeddings(tmp_path, dim):
    out = tmp_path / "run"
    assert main(SMALL + ["--dim", str(dim), "--epochs", "2", "--out", str(out)]) == 0
    embedding, progress = _read_png(out / "embedding.png"), _read_png(out / "progress.png")
    two_d = _read_png_of_dim(tmp_path, 2)
    # 3-D: three projections side by side (a wider figure than the 2-D scatter); 1-D: a flatter strip plot
    if dim == 3:
        assert embedding.shape[1] > 1.8 * two_d.shape[1]
    else:
        assert embedding.shape[0] < 0.8 * two_d.shape[0]
    assert progress.shape[1] > progress.shape[0]  # panels of the epochs beside the loss curve
    assert json.loads((out / "metrics.json").read_text())["dim"] == dim


def _read_png_of_dim(tmp_path, dim):
    from fastdml.demo.plot import plot_embedding

    rng = np.random.default_rng(0)
    path = plot_embedding(rng.normal(size=(50, dim)), np.arange(50) % 10, tmp_path / f"ref{dim}.png")
    return _read_png(path)


def test_snapshot_epochs_span_the_run():
    assert snapshot_epochs(20) == [0, 1, 2, 5, 10, 20]
    assert snapshot_epochs(1) == [0, 1]
    assert snapshot_epochs(3) == [0, 1, 2, 3]


def test_progress_plot_rejects_no_snapshots_and_mismatched_labels(tmp_path):
    from fastdml.demo.plot import plot_progress

    with pytest.raises(ValueError, match="at least one"):
        plot_progress([], np.arange(5), [1.0], tmp_path / "p.png")
    with pytest.raises(ValueError, match="n = len"):
        plot_progress([(0, np.zeros((4, 2)))], np.arange(5), [1.0], tmp_path / "p.png")


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
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
        (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
        (["--margin", "nan"], "--margin must be a finite number"),
        (["--loss", "paired-contrastive", "--positive-weight", "nan"], "--positive-weight must be a finite"),
        (["--classes-per-batch", "11"], "--classes-per-batch must be <= 10"),
        (["--test-subset", "1"], "--test-subset must be >= 2"),
        (["--loss", "paired-contrastive", "--reducer", "mean"], "--reducer applies to --loss contrastive"),
        (["--reducer", "sum"], "invalid choice"),
        (["--width", "0"], "--width must be >= 1"),
        (["--shift", "-3"], "--shift must be in [0, 13]"),
        (["--shift", "14"], "--shift must be in [0, 13]"),
        (["--validation", "-5"], "--validation must be >= 0"),
        (["--validation", "60000"], "--validation must be < 60000"),
        (["--train-subset", "1"], "--classes-per-batch 10 exceeds the 1 digits present"),
        (
            [
                "--loss",
                "paired-contrastive",
                "--mining",
                "none",
                "--classes-per-batch",
                "1",
                "--samples-per-class",
                "1",
            ],
            "needs batches of at least 2 images",
        ),
        (
            ["--loss", "paired-contrastive", "--mining", "none", "--train-subset", "100"],
            "--train-subset 100 is smaller than one batch",
        ),
        (["--loss", "paired-contrastive", "--samples-per-class", "1"], "--samples-per-class must be >= 2"),
        (
            ["--loss", "triplet", "--mining", "batch-hard", "--samples-per-class", "1"],
            "--samples-per-class must be >= 2",
        ),
        (["--samples-per-class", "1"], "--samples-per-class must be >= 2"),
        (["--test-subset", "3"], "hold no digit twice"),  # the first three test digits are 7, 2, 1
    ],
)
def test_bad_options_exit_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(argv + ["--no-progress", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a rejected run


def test_out_naming_an_existing_file_is_an_argparse_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(SystemExit) as info:
        main(SMALL + ["--out", str(tmp_path / "taken")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "names an existing file" in err
    assert (tmp_path / "taken").read_text() == "keep me"


def test_diverging_run_stops_at_the_first_non_finite_step_naming_epoch_and_lr(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SMALL + ["--lr", "1e30", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "at epoch 1, step" in err and "--lr 1e+30" in err, err
    assert not (out / "metrics.json").exists()  # a diverged model is not reported as a result


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

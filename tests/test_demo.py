"""Smoke runs of the MNIST demo on a few hundred images: outputs exist and are valid; the CLI is documented."""

import json

import numpy as np
import pytest
import torch

from fastdml.demo.__main__ import build_parser, main, snapshot_epochs
from fastdml.demo.recipes import DEFAULTS
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
    for key in ("weight_decay", "rotate", "scale", "shift", "width", "lr"):  # options left unset: the loss's defaults
        assert metrics[key] == DEFAULTS[loss][key], key
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


@pytest.mark.parametrize("augment", [[], ["--rotate", "0", "--scale", "0", "--shift", "2"]])  # warp, whole pixels
def test_demo_is_deterministic_given_the_seed(tmp_path, augment):
    runs = []
    for name in ("a", "b"):
        assert main(SMALL + augment + ["--seed", "3", "--out", str(tmp_path / name)]) == 0
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
        (["--rotate", "-1"], "--rotate must be in [0, 180] degrees"),
        (["--rotate", "nan"], "--rotate must be in [0, 180] degrees"),
        (["--rotate", "181"], "--rotate must be in [0, 180] degrees"),
        (["--scale", "0.6"], "--scale must be in [0, 0.5]"),
        (["--scale", "inf"], "--scale must be in [0, 0.5]"),
        (["--scale=-0.1"], "--scale must be in [0, 0.5]"),
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


@pytest.mark.parametrize("train_subset", ["60", "240"])
def test_runs_of_fewer_steps_than_the_schedule_warm_up_train(tmp_path, train_subset):
    # one or four steps: shorter than the one-cycle schedule's shortest warm-up
    out = tmp_path / "run"
    assert main(SMALL + ["--train-subset", train_subset, "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == int(train_subset) // 60


def test_affine_warp_turns_clockwise_moves_right_and_down_and_fills():
    from fastdml.demo.train import affine_warp

    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ones, still = torch.ones(3), torch.zeros(3, 2)
    torch.testing.assert_close(affine_warp(x, 0 * ones, ones, still, fill=0.0), x, atol=1e-4, rtol=0)
    turned = affine_warp(x, 90 * ones, ones, still, fill=0.0)
    torch.testing.assert_close(turned, torch.rot90(x, -1, (2, 3)), atol=1e-4, rtol=0)
    moved = affine_warp(x, 0 * ones, ones, torch.tensor([[2.0, 1.0]] * 3), fill=-5.0)
    expected = torch.full_like(x, -5.0)
    expected[..., 1:, 2:] = x[..., :-1, :-2]
    torch.testing.assert_close(moved, expected, atol=1e-4, rtol=0)
    # zoom 2 about the centre: the central 14 x 14 pixels fill the image, each read by a 2 x 2 block
    flat = torch.arange(28.0).repeat(28, 1)[None, None].expand(3, 1, 28, 28)
    zoomed = affine_warp(flat, 0 * ones, 2 * ones, still, fill=0.0)
    assert zoomed.amin() >= 6.5 - 1e-4 and zoomed.amax() <= 20.5 + 1e-4


@pytest.mark.parametrize(
    "dtype, shape", [(torch.float32, (28, 28)), (torch.float64, (20, 33)), (torch.float64, (1, 5))]
)
def test_affine_grid_by_broadcasting_matches_torch(dtype, shape):
    from fastdml.demo.train import _affine_grid

    theta = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    expected = torch.nn.functional.affine_grid(theta, [7, 1, *shape], align_corners=False)
    # three terms (|x|, |y| < 1) summed in either order: within a few roundings of the sum of their magnitudes
    bound = 4 * torch.finfo(dtype).eps * float(theta.abs().sum(-1).max())
    torch.testing.assert_close(_affine_grid(theta, *shape), expected, rtol=0, atol=bound)


@pytest.mark.parametrize(
    "shape, pixel, angle, offset, expected",
    [
        # 3.5 right of and 0.5 below the centre: turned clockwise it lies 3.5 below and 0.5 left of it
        ((28, 28), (14, 17), 90.0, (0.0, 0.0), (17, 13)),
        ((28, 28), (14, 17), 90.0, (3.0, 0.0), (17, 16)),  # the offset moves the turned digit
        ((28, 28), (14, 17), -90.0, (0.0, -2.0), (8, 14)),
        ((20, 40), (10, 23), 90.0, (0.0, 0.0), (13, 19)),  # not square: no shear
        ((20, 40), (10, 23), 0.0, (-5.0, 2.0), (12, 18)),
    ],
)
def test_affine_warp_moves_one_pixel_where_the_docstring_says(shape, pixel, angle, offset, expected):
    from fastdml.demo.train import affine_warp

    image = torch.zeros(1, 1, *shape)
    image[0, 0, pixel[0], pixel[1]] = 1.0
    out = affine_warp(image, torch.tensor([angle]), torch.ones(1), torch.tensor([offset]), fill=0.0)[0, 0]
    assert divmod(int(out.argmax()), shape[1]) == expected
    torch.testing.assert_close(out.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)  # one whole pixel, not smeared
    assert out.max() > 1 - 1e-4


def test_random_affine_draws_bounded_parameters_from_the_generator():
    from fastdml.demo.train import affine_warp, random_affine

    x = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = random_affine(x, 2.0, 15.0, 0.1, torch.Generator().manual_seed(7))
    # the draws: u uniform in [-1, 1]^4 from the generator, scaled to the three ranges
    u = torch.rand(50, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    torch.testing.assert_close(out, affine_warp(x, u[:, 0] * 15.0, 1 + u[:, 1] * 0.1, u[:, 2:] * 2.0), rtol=0, atol=0)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(random_affine(x, 0.0, 0.0, 0.0, torch.Generator()), x, atol=1e-4, rtol=0)


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

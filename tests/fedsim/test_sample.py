"""``fedsim sample``: PNG grids drawn from a density run's final model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedsim import data, models
from fedsim.checkpoint import load_checkpoint
from fedsim.cli import main
from fedsim.runner import run
from fedsim.sample import BORDER, draw, run_levels, tile, to_pixels

FAST = [
    "dataset=digits",
    "num_clients=2",
    "num_rounds=1",
    "simulation.engine=inprocess",
]


@pytest.fixture(scope="module")
def density_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("density") / "run"
    run(
        [
            *FAST,
            "task=density",
            "model=iresnet_flow",
            "model.hidden=[[8,8],[8,8]]",
            "dataset.dequantize=true",
            "task.levels=17",
            "client=adam",
            f"output_dir={folder}",
        ],
        progress=lambda r: None,
    )
    return folder


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("classifier") / "run"
    run([*FAST, "model.hidden=[16]", f"output_dir={folder}"], progress=lambda r: None)
    return folder


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "L"
        return np.asarray(image)


def test_sample_writes_a_png_grid_of_the_requested_size(
    density_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid" / "ten.png"
    assert main(["sample", str(density_run), "--n", "10", "--out", str(out)]) == 0
    grid = _png(out)
    # 10 samples of 8x8: 4 per row, 3 rows, one-pixel borders: 4*9+1 by 3*9+1
    assert grid.shape == (28, 37)
    assert f"wrote {out}" in capsys.readouterr().out
    # the two cells after the tenth sample and every border are grey
    assert np.all(grid[19:, 19:] == BORDER)
    assert np.all(grid[::9, :] == BORDER) and np.all(grid[:, ::9] == BORDER)


def test_default_grid_is_64_samples_in_the_run_folder(density_run: Path) -> None:
    assert main(["sample", str(density_run)]) == 0
    assert _png(density_run / "samples.png").shape == (73, 73)  # 8 x 9 + 1


def test_the_png_holds_the_models_samples_mapped_to_pixels(
    density_run: Path, tmp_path: Path
) -> None:
    args = ["sample", str(density_run), "--n", "5", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert main([*args[:-1], "4", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (_png(tmp_path / f"{k}.png") for k in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # rebuilt by hand from the checkpoint: the same prior draws through the inverse
    ckpt = load_checkpoint(density_run)
    flow = models.build(ckpt.model_name, **ckpt.model_kwargs)
    flow.load_state_dict(ckpt.global_state)
    flow.eval()
    samples = flow.sample(5, torch.Generator().manual_seed(3))
    eps = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prior = flow.prior_mean + flow.prior_log_std.exp() * eps
        assert torch.allclose(flow.encode(samples), prior, atol=1e-4)
    levels = torch.floor((samples + 0.5) * 17).clamp(0, 16)
    expected = torch.round(levels * 255 / 16).to(torch.uint8)
    assert np.array_equal(a[1:9, 1:9], expected[0, 0].numpy())
    # 5 samples: 3 per row, so the fifth is the second of the second row
    assert np.array_equal(a[10:18, 10:18], expected[4, 0].numpy())


def test_pixels_invert_the_datasets_dequantisation(density_run: Path) -> None:
    assert run_levels(density_run) == 17
    deq = data.load("digits", seed=0, dequantize=True).test.x
    plain = data.load("digits", seed=0).test.x
    grey = torch.round((plain * data.digits.STD + data.digits.MEAN) * 16)
    expected = torch.round(grey * 255 / 16).to(torch.uint8).numpy()
    assert np.array_equal(to_pixels(deq, 17), expected)


def test_pixel_mapping_hand_values() -> None:
    s = torch.tensor([-0.5, 0.0, 3.5 / 17 - 0.5, 0.49999, 7.0, float("nan"), -np.inf])
    pixels = to_pixels(s.reshape(1, 1, 1, -1), 17).ravel().tolist()
    # levels 0, floor(8.5) = 8, 3, 16, clipped 16, NaN -> 0, -inf -> 0; times 255/16
    assert pixels == [0, 128, 48, 255, 255, 0, 0]
    assert to_pixels(torch.tensor([[[[0.0]]]]), 256).item() == 128


def test_tile_lays_images_out_row_by_row() -> None:
    pixels = np.arange(1, 4, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 1, 2, 3), dtype=np.uint8
    )
    grid = tile(pixels)  # 3 images of 2x3: 2 per row, 2 rows
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1)
    assert np.all(grid[1:3, 1:4] == 1) and np.all(grid[1:3, 5:8] == 2)
    assert np.all(grid[4:6, 1:4] == 3) and np.all(grid[4:6, 5:8] == BORDER)
    rgb = tile(np.zeros((1, 3, 2, 2), dtype=np.uint8))
    assert rgb.shape == (4, 4, 3)


def test_a_folder_without_a_checkpoint_is_one_sentence_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sample", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint.pt" in err and err.count("\n") == 1
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_model_that_cannot_sample_is_one_sentence_and_exit_2(
    classifier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sample", str(classifier_run)]) == 2
    err = capsys.readouterr().err
    assert "trained model 'mlp', which cannot draw samples" in err
    assert err.count("\n") == 1
    assert not (classifier_run / "samples.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "--n=0 must be at least 1"),
        (["--n", "many"], "invalid int value: 'many'"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_options_are_refused(
    density_run: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sample", str(density_run), *args]) == 2
    assert message in capsys.readouterr().err


def test_help_and_a_missing_folder_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--help"]) == 0
    assert "usage: fedsim sample <run folder>" in capsys.readouterr().out
    assert main(["sample"]) == 2
    assert "required: run_dir" in capsys.readouterr().err


def test_draw_returns_an_image_batch(density_run: Path) -> None:
    samples = draw(density_run, 3, seed=0)
    assert samples.shape == (3, 1, 8, 8)

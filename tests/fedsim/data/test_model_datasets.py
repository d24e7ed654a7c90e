"""Datasets of the architecture library: poisson, mnist5k_rot, gaussians,
digit_pair, and ArrayDataset's regression targets."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedsim import data
from fedsim.data import ArrayDataset, DataSplits
from fedsim.data.digits import source_arrays as digits_source
from fedsim.data.gaussians import mean_shift
from fedsim.data.mnist5k_rot import rotated_source
from fedsim.data.poisson import SOURCE_SCALE, solve_poisson
from fedsim.exceptions import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]
OURS = ("poisson", "mnist5k_rot", "gaussians", "digit_pair")


@pytest.mark.parametrize("name", OURS)
def test_registered_with_a_config_listing_every_option(name: str) -> None:
    assert name in data.names()
    config = yaml.safe_load((ROOT / "configs" / "dataset" / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    params = inspect.signature(data.DATASETS.get(name)).parameters.values()
    defaults = {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in params
        if p.name != "seed"
    }
    assert config == defaults
    assert all(p.kind is p.KEYWORD_ONLY for p in params)


# --- regression targets -------------------------------------------------------------


def test_array_dataset_holds_field_targets_and_keeps_its_checks() -> None:
    ds = ArrayDataset(x=torch.zeros(4, 1, 2, 2), y=torch.arange(12.0).reshape(4, 3))
    assert len(ds) == 4
    assert ds.subset(np.array([3, 1])).y.tolist() == [
        [9.0, 10.0, 11.0],
        [3.0, 4.0, 5.0],
    ]
    with pytest.raises(DataError, match=r"y of shape \(N,\) or \(N, \.\.\.\)"):
        ArrayDataset(x=torch.zeros(4, 2), y=torch.zeros(3, 5))
    with pytest.raises(DataError, match="x of shape"):
        ArrayDataset(x=torch.zeros(4, 2), y=torch.tensor(1.0))


# --- poisson ------------------------------------------------------------------------


def test_poisson_inputs_targets_split_and_determinism() -> None:
    splits = data.load("poisson", seed=3, num_problems=30, grid=6, test_fraction=0.2)
    assert isinstance(splits, DataSplits)
    assert splits.input_shape == (1, 6, 6) and splits.num_classes == 36
    assert splits.train.x.shape == (24, 1, 6, 6) and splits.test.x.shape == (6, 1, 6, 6)
    assert splits.train.y.shape == (24, 36) and splits.test.y.shape == (6, 36)
    assert splits.train.x.dtype == splits.train.y.dtype == torch.float32
    for part in (splits.train, splits.test):
        for source, solution in zip(part.x, part.y, strict=True):
            expected = solve_poisson(source[0].double().numpy() * SOURCE_SCALE)
            np.testing.assert_allclose(
                solution.numpy(), expected.reshape(-1), rtol=1e-5, atol=1e-5
            )
    # train and test are different problems
    both = torch.cat([splits.train.x, splits.test.x]).flatten(1)
    assert len({tuple(row.tolist()) for row in both}) == 30
    data._CACHE.clear()  # build again, not from the cache
    again = data.load("poisson", seed=3, num_problems=30, grid=6, test_fraction=0.2)
    assert again is not splits
    assert torch.equal(again.train.x, splits.train.x)
    assert torch.equal(again.test.y, splits.test.y)
    other = data.load("poisson", seed=4, num_problems=30, grid=6, test_fraction=0.2)
    assert not torch.equal(other.train.x, splits.train.x)


def test_poisson_field_matches_gen_field_head_layout() -> None:
    from fedsim import models

    splits = data.load("poisson", seed=0, num_problems=4, grid=5, test_fraction=0.5)
    model = models.build(
        "gen",
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        grid=2,
    )
    assert model.head == "field"
    assert model(splits.train.x).shape == splits.train.y.shape


def test_poisson_bad_options_fail_early() -> None:
    with pytest.raises(ConfigError, match="num_problems must be >= 2"):
        data.load("poisson", num_problems=1)
    with pytest.raises(ConfigError, match="grid must be an integer >= 2"):
        data.load("poisson", grid=1)
    with pytest.raises(DataError, match="leaves an empty test set"):
        data.load("poisson", num_problems=3, test_fraction=0.1)


# --- mnist5k_rot ------------------------------------------------------------------


def test_mnist5k_rot_without_rotation_or_scaling_equals_mnist5k() -> None:
    plain = data.load("mnist5k", seed=1)
    still = data.load(
        "mnist5k_rot", seed=1, max_degrees=0.0, min_scale=1.0, max_scale=1.0
    )
    assert still.input_shape == plain.input_shape and still.num_classes == 10
    assert torch.equal(still.train.y, plain.train.y)
    assert torch.equal(still.test.y, plain.test.y)
    torch.testing.assert_close(still.train.x, plain.train.x, atol=1e-4, rtol=0)
    torch.testing.assert_close(still.test.x, plain.test.x, atol=1e-4, rtol=0)


def test_mnist5k_rot_poses_are_seeded_and_in_range() -> None:
    images, angles, scales = rotated_source(
        seed=5, max_degrees=30.0, min_scale=0.9, max_scale=1.1
    )
    again, angles2, _ = rotated_source(
        seed=5, max_degrees=30.0, min_scale=0.9, max_scale=1.1
    )
    assert np.array_equal(images, again) and np.array_equal(angles, angles2)
    _, angles3, _ = rotated_source(
        seed=6, max_degrees=30.0, min_scale=0.9, max_scale=1.1
    )
    assert not np.array_equal(angles, angles3)
    assert np.abs(angles).max() <= math.radians(30.0) + 1e-6
    assert np.abs(angles).max() > math.radians(25.0)  # they fill the range
    assert scales.min() >= 0.9 - 1e-6 and scales.max() <= 1.1 + 1e-6
    assert images.shape == (5000, 1, 28, 28)
    assert images.min() >= 0.0 and images.max() <= 255.0 + 1e-3
    # the same digits, transformed: ink is (about) conserved at scale ~1
    from fedsim.data.mnist5k import source_arrays

    ink = source_arrays()[0].reshape(5000, -1).sum(1)
    moved = images.reshape(5000, -1).sum(1)
    np.testing.assert_allclose(moved / ink, scales**2, rtol=0.15)


def test_mnist5k_rot_quarter_turn_moves_pixels_onto_pixels() -> None:
    images, angles, _ = rotated_source(
        seed=0, max_degrees=90.0, min_scale=1.0, max_scale=1.0
    )
    from fedsim.data._rotations import rotate_scale
    from fedsim.data.mnist5k import source_arrays

    original = torch.from_numpy(np.array(source_arrays()[0][:3]))
    turned = rotate_scale(
        original, angles=torch.full((3,), math.pi / 2), scales=torch.ones(3)
    )
    torch.testing.assert_close(
        turned, torch.rot90(original, 1, dims=(-2, -1)), atol=1e-3, rtol=0
    )
    assert images.shape[0] == angles.shape[0] == 5000


def test_mnist5k_rot_bad_options_fail_early() -> None:
    with pytest.raises(ConfigError, match=r"max_degrees must lie in \[0, 180\]"):
        data.load("mnist5k_rot", max_degrees=200.0)
    with pytest.raises(ConfigError, match="0 < min_scale <= max_scale"):
        data.load("mnist5k_rot", min_scale=1.2, max_scale=1.1)


# --- gaussians ----------------------------------------------------------------------


def test_gaussians_have_the_documented_means_spread_and_layout() -> None:
    splits = data.load(
        "gaussians", seed=2, dim=4, distance=3.0, std=0.5, train_samples=4000
    )
    assert splits.input_shape == (4,) and splits.num_classes == 1
    assert splits.train.x.shape == (8000, 4) and splits.test.x.shape == (1000, 4)
    for part in (splits.train, splits.test):
        assert part.y.dtype == torch.int64
        assert part.y.tolist() == [0, 1] * (len(part) // 2)  # interleaved P, Q
    shift = mean_shift(seed=2, dim=4, distance=3.0)
    assert np.linalg.norm(shift) == pytest.approx(3.0)  # the exact W1
    x, y = splits.train.x.double().numpy(), splits.train.y.numpy()
    p, q = x[y == 0], x[y == 1]
    # sample means within 5 standard errors (0.5 / sqrt(4000) = 0.008)
    np.testing.assert_allclose(p.mean(0), 0.0, atol=0.04)
    np.testing.assert_allclose(q.mean(0), shift, atol=0.04)
    np.testing.assert_allclose(p.std(0), 0.5, atol=0.03)
    np.testing.assert_allclose(np.cov((q - shift).T), 0.25 * np.eye(4), atol=0.03)
    # the direction depends on the seed only
    assert np.allclose(mean_shift(seed=2, dim=4, distance=1.0) * 3.0, shift)


def test_gaussians_bad_options_fail_early() -> None:
    with pytest.raises(ConfigError, match="dim must be an integer >= 1"):
        data.load("gaussians", dim=0)
    with pytest.raises(ConfigError, match="distance must be finite and >= 0"):
        data.load("gaussians", distance=-1.0)
    with pytest.raises(ConfigError, match="std must be finite and positive"):
        data.load("gaussians", std=0.0)


# --- digit_pair ---------------------------------------------------------------------


def test_digit_pair_holds_the_two_digits_balanced_in_the_test_set() -> None:
    splits = data.load("digit_pair", seed=0, classes=[1, 7], test_fraction=0.25)
    images, labels = digits_source()
    ones = images[labels == 1].reshape(-1, 64) / 16.0
    sevens = images[labels == 7].reshape(-1, 64) / 16.0
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 1
    n_test = round(min(len(ones), len(sevens)) * 0.25)
    assert splits.test.y.tolist() == [0, 1] * n_test
    assert len(splits.train) + len(splits.test) == len(ones) + len(sevens)
    rows = {
        0: {tuple(r) for r in ones.tolist()},
        1: {tuple(r) for r in sevens.tolist()},
    }
    for part in (splits.train, splits.test):
        for x, y in zip(part.x.reshape(-1, 64).tolist(), part.y.tolist(), strict=True):
            assert tuple(x) in rows[y]
    with pytest.raises(ConfigError, match="two different digits"):
        data.load("digit_pair", classes=[3, 3])

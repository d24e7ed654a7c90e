"""Equivariant Transformer Network: canonical coordinates, composition, equivariance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from fedsim import models
from fedsim.data._rotations import random_rotate_scale, rotate_scale
from fedsim.exceptions import ConfigError
from fedsim.models._etn_transforms import GROUPS, apply_homography
from fedsim.models.etn import ETN, EquivariantTransformer
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import perturb_state

ROOT = Path(__file__).resolve().parents[3]

# the pure-rotation model of the spec's "minimal models" for 8x8 digits
ROTATION_8X8 = {
    "ets": ["rotation"],
    "nf": [[8, 8]],
    "grid_size": [16, 16],
    "classifier_grid": "identity",
    "classifier_channels": [16, 32],
}


def wrap(angle: torch.Tensor) -> torch.Tensor:
    """Angles to ``[-pi, pi)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def random_points(n: int, seed: int) -> torch.Tensor:
    """Points in ``[-1, 1]^2`` kept away from both axes (every chart is regular)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    signs = torch.randint(0, 2, (n, 2), generator=gen).double() * 2 - 1
    return p * signs


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def blob_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth, asymmetric images (four Gaussian blobs) faded out beyond radius 0.8."""
    gen = torch.Generator().manual_seed(seed)
    line = torch.linspace(-1, 1, size)
    ys, xs = torch.meshgrid(line, line, indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(4):
            cx, cy = ((torch.rand(2, generator=gen) * 2 - 1) * 0.5).tolist()
            width = 0.1 + 0.15 * float(torch.rand(1, generator=gen))
            out[i, 0] += torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * width**2))
    disc = ((0.9 - torch.sqrt(xs**2 + ys**2)) / 0.1).clamp(0, 1)
    return out * disc


# --- (1) canonical coordinates -------------------------------------------------


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_group_acts_as_a_translation_in_canonical_coordinates(name: str) -> None:
    group = GROUPS[name]
    p = random_points(200, seed=0)
    gen = torch.Generator().manual_seed(1)
    theta = torch.rand(200, group.num_params, generator=gen, dtype=torch.float64) - 0.5
    moved = apply_homography(group.matrix(theta), p[:, None, :])[:, 0]
    shift = group.to_canonical(moved) - group.to_canonical(p)
    expected = torch.zeros_like(shift)
    predicted = [i for i, a in enumerate(group.axes) if a.predicted]
    expected[:, predicted] = theta
    for i, axis in enumerate(group.axes):
        if axis.periodic:
            shift[:, i] = wrap(shift[:, i] - expected[:, i])
            expected[:, i] = 0
    torch.testing.assert_close(shift, expected, atol=1e-9, rtol=0)
    # the group never moves a point to another sheet
    torch.testing.assert_close(group.sheet(moved), group.sheet(p))


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_inverse_coordinates_and_grid_cover_the_box(name: str) -> None:
    group = GROUPS[name]
    p = random_points(200, seed=2)
    back = group.from_canonical(group.to_canonical(p), group.sheet(p))
    torch.testing.assert_close(back, p, atol=1e-12, rtol=0)
    # the grid is rho^-1 of the box samples: u along the width, v along the height
    h, w = 8, 6
    grid = group.grid((h, w), dtype=torch.float64, device=torch.device("cpu"))
    assert grid.shape == (h, w, 2)
    kw = {"dtype": torch.float64, "device": torch.device("cpu")}
    us = group.u.samples(w, **kw)
    rows = h // group.sheets
    vs = group.v.samples(rows, **kw).repeat(group.sheets)
    coords = group.to_canonical(grid)
    regular = grid.norm(dim=-1) > 1e-9  # the polar grid's r = 0 row has no angle
    diff_u = coords[..., 0] - us[None, :]
    diff_v = coords[..., 1] - vs[:, None]
    if group.u.periodic:
        diff_u = wrap(diff_u)
    if group.v.periodic:
        diff_v = wrap(diff_v)
    assert diff_u[regular].abs().max() < 1e-12
    assert diff_v[regular].abs().max() < 1e-12
    sheets = group.sheet(grid)
    assert (sheets[:rows] == 1).all()
    assert (sheets[rows:] == -1).all()


def test_homographies_move_points_as_computed_by_hand() -> None:
    def move(name: str, theta: list[float], point: list[float]) -> list[float]:
        m = GROUPS[name].matrix(torch.tensor([theta], dtype=torch.float64))
        p = torch.tensor([[point]], dtype=torch.float64)
        return apply_homography(m, p)[0, 0].tolist()

    cases = [
        ("translation", [0.5, -0.25], [0.0, 0.0], [0.5, -0.25]),
        ("rotation", [math.pi / 2], [1.0, 0.0], [0.0, 1.0]),
        ("scale", [math.log(3.0)], [0.3, 0.2], [0.9, 0.6]),
        ("rotation_scale", [math.log(2.0), math.pi], [0.5, 0.0], [-1.0, 0.0]),
        ("shear_x", [2.0], [0.5, 0.5], [1.5, 0.5]),
        ("shear_y", [2.0], [0.5, 0.5], [0.5, 1.5]),
        ("scale_x", [math.log(2.0)], [0.5, 0.5], [1.0, 0.5]),
        ("scale_y", [math.log(2.0)], [0.5, 0.5], [0.5, 1.0]),
        ("hyperbolic_rotation", [math.log(2.0)], [1.0, 1.0], [2.0, 0.5]),
    ]
    for name, theta, point, expected in cases:
        assert move(name, theta, point) == pytest.approx(expected, abs=1e-12), name


# --- (2) composition -----------------------------------------------------------


def test_layers_sample_through_and_compose_after_the_previous_transform() -> None:
    torch.manual_seed(0)
    model = models.build(
        "etn",
        input_shape=(1, 16, 16),
        num_classes=10,
        ets=["translation", "rotation", "shear_x"],
        nf=[[4, 4], [4, 4], [4, 4]],
    ).double()
    perturb_state(model)
    model.eval()
    x = blob_images(3, 16, seed=0).double()
    assert isinstance(model, ETN)
    grid_c = model.classifier_group.grid(
        (16, 16), dtype=x.dtype, device=x.device
    ).expand(3, -1, -1, -1)
    transform = torch.eye(3, dtype=x.dtype).expand(3, 3, 3)
    with torch.no_grad():
        for layer in model.ets:
            assert isinstance(layer, EquivariantTransformer)
            # the layer's input: x at T_prev(rho^-1(grid)), sampled here by hand
            grid = layer.group.grid(layer.grid_size, dtype=x.dtype, device=x.device)
            points = apply_homography(transform, grid.expand(3, -1, -1, -1))
            seen = F.grid_sample(x, points, align_corners=True)
            theta = layer.params(seen)
            composed, theta_layer = layer(x, transform)
            torch.testing.assert_close(theta_layer, theta)
            t_new = layer.group.matrix(theta)
            expected = apply_homography(transform, apply_homography(t_new, grid_c))
            torch.testing.assert_close(apply_homography(composed, grid_c), expected)
            # the other order is a different map here (these groups do not commute)
            swapped = apply_homography(t_new, apply_homography(transform, grid_c))
            if layer is not model.ets[0]:
                assert (swapped - expected).abs().max() > 1e-3
            transform = composed
        final, _ = model.pose(x)
        torch.testing.assert_close(final, transform)
        canonical = F.grid_sample(
            x, apply_homography(transform, grid_c), align_corners=True
        )
        torch.testing.assert_close(model.canonicalize(x), canonical)


# --- (3) exact equivariance along periodic axes ----------------------------------


@pytest.mark.parametrize(
    ("name", "dim"),
    [("rotation", 3), ("rotation_scale", 2), ("scale", 2)],
)
def test_rolling_a_periodic_axis_shifts_the_prediction_exactly(
    name: str, dim: int
) -> None:
    torch.manual_seed(0)
    group = GROUPS[name]
    layer = EquivariantTransformer(
        group=group, in_channels=1, grid_size=(16, 24), widths=(8, 8), strides=(2, 1)
    )
    perturb_state(layer)
    layer.eval()
    axis = 0 if dim == 3 else 1  # width is u, height is v
    length = (24, 16)[axis]
    delta = 2 * math.pi / length
    stride = 2
    z = torch.randn(5, 1, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = layer.params(z)
        for k in (1, 2, 5):
            after = layer.params(torch.roll(z, k * stride, dims=dim))
            expected = before.clone()
            predicted = [i for i, a in enumerate(group.axes) if a.predicted]
            if axis in predicted:
                col = predicted.index(axis)
                expected[:, col] = before[:, col] + k * stride * delta
            diff = after - expected
            for col, i in enumerate(predicted):
                if group.axes[i].periodic:
                    diff[:, col] = wrap(diff[:, col])
            assert diff.abs().max() < 1e-4, (k, diff)


# --- (4) the key test: rotating the input rotates the prediction -----------------


def test_rotating_the_input_rotates_the_predicted_pose() -> None:
    torch.manual_seed(0)
    model = models.build(
        "etn",
        input_shape=(1, 28, 28),
        num_classes=10,
        ets=["rotation"],
        nf=[[8, 8]],
        grid_size=[16, 32],
        classifier_grid="identity",
    )
    perturb_state(model)
    model.eval()
    x = blob_images(8, 28, seed=1)
    step = 2 * math.pi / 32  # the angle step of the ET grid
    with torch.no_grad():
        _, (theta,) = model.pose(x)
        canonical = model.canonicalize(x)
        for k in (2, 4, 6, 10):
            phi = k * step
            # rotate_scale turns counterclockwise as displayed, i.e. by the group
            # element R(-angle) in the (x, y-down) frame: -phi moves content by R(phi)
            turned = rotate_scale(
                x, angles=torch.full((8,), -phi), scales=torch.ones(8)
            )
            _, (theta_turned,) = model.pose(turned)
            error = wrap(theta_turned[:, 0] - theta[:, 0] - phi)
            assert error.abs().max() < step, (k, error)
            same = correlation(model.canonicalize(turned), canonical)
            assert same.min() > 0.9, (k, same)
            # without the ET the classifier would see clearly different images
            assert correlation(turned, x).min() < 0.9


# --- (5) the rotated-data transform -------------------------------------------------


def test_rotate_scale_identity_quarter_turns_and_magnification() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 9, 9, generator=gen)
    same, angles, scales = random_rotate_scale(
        x, max_angle=0.0, log_scale_range=(0.0, 0.0), generator=gen
    )
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    assert (angles == 0).all() and (scales == 1).all()
    ones = torch.ones(4)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    quarter = rotate_scale(x, angles=ones * math.pi / 2, scales=ones)
    torch.testing.assert_close(
        quarter[inner], torch.rot90(x, 1, dims=(-2, -1))[inner], atol=1e-5, rtol=0
    )
    back = rotate_scale(x, angles=-ones * math.pi / 2, scales=ones)
    torch.testing.assert_close(
        back[inner], torch.rot90(x, -1, dims=(-2, -1))[inner], atol=1e-5, rtol=0
    )
    # magnifying by 2 about the centre pixel (4, 4): output (4 + 2i, 4 + 2j) reads
    # input (4 + i, 4 + j)
    zoom = rotate_scale(x, angles=ones * 0, scales=ones * 2)
    torch.testing.assert_close(zoom[..., ::2, ::2], x[..., 2:7, 2:7], atol=1e-6, rtol=0)


def test_random_rotate_scale_draws_within_the_ranges_from_the_generator() -> None:
    x = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return random_rotate_scale(
            x,
            max_angle=math.pi / 4,
            log_scale_range=(-0.5, 0.25),
            generator=torch.Generator().manual_seed(seed),
        )

    out, angles, scales = draw(1)
    assert out.shape == x.shape and angles.shape == scales.shape == (500,)
    assert angles.abs().max() <= math.pi / 4
    assert angles.min() < -0.7 and angles.max() > 0.7  # fills the range
    logs = torch.log(scales)
    assert logs.min() >= -0.5 - 1e-6 and logs.max() <= 0.25 + 1e-6
    again, angles_again, _ = draw(1)
    assert torch.equal(again, out) and torch.equal(angles_again, angles)
    assert not torch.equal(draw(2)[1], angles)
    # each image is rotate_scale of its own draw
    torch.testing.assert_close(out, rotate_scale(x, angles=angles, scales=scales))


def test_rotate_scale_rejects_bad_arguments() -> None:
    x = torch.rand(2, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="max_angle"):
        random_rotate_scale(x, max_angle=-1.0, log_scale_range=(0, 0), generator=gen)
    with pytest.raises(ValueError, match="log_scale_range"):
        random_rotate_scale(x, max_angle=1.0, log_scale_range=(1, 0), generator=gen)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_rotate_scale(x[0], max_angle=1.0, log_scale_range=(0, 0), generator=gen)
    with pytest.raises(ValueError, match="scales must be positive"):
        rotate_scale(x, angles=torch.zeros(2), scales=torch.tensor([1.0, 0.0]))


# --- (6) training ----------------------------------------------------------------


def test_training_on_digits_lowers_the_loss() -> None:
    torch.manual_seed(0)
    x, y = digit_images()
    x = x / 16.0
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:1400], order[1400:]
    model = models.build("etn", input_shape=(1, 8, 8), num_classes=10, **ROTATION_8X8)
    losses = adam_steps(
        model, x, y, steps=200, batch=32, lr=2e-2, generator=gen, pool=train
    )
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert first > 2.0
    assert last < 0.5 * first and last < 0.6, (first, last)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


# --- options, widths and config -------------------------------------------------


def test_bad_options_fail_with_one_sentence() -> None:
    small = {"input_shape": (1, 8, 8), "num_classes": 10}
    with pytest.raises(ConfigError, match=r"unknown ET 'spin'.*rotation"):
        models.build("etn", **small, ets=["spin"], nf=[[4, 4]])
    with pytest.raises(ConfigError, match=r"one \[conv1, conv2\] pair"):
        models.build("etn", **small, ets=["rotation"], nf=[[4, 4], [4, 4]])
    with pytest.raises(ConfigError, match=r"classifier_grid 'radial'.*logpolar"):
        models.build("etn", **small, classifier_grid="radial")
    with pytest.raises(ConfigError, match="grid_size"):
        models.build("etn", **small, grid_size=[16])


def test_spec_groups_rebuild_at_new_widths() -> None:
    model = models.build("etn", input_shape=(1, 8, 8), num_classes=10)
    spec = models.permutation_spec(model)
    assert spec.names() == [
        "ets.0.conv1",
        "ets.0.conv2",
        "ets.1.conv1",
        "ets.1.conv2",
        "ets.2.conv1",
        "ets.2.conv2",
        "classifier.0",
        "classifier.1",
        "classifier.2",
    ]
    widths = {"ets.0.conv2": 5, "ets.2.conv1": 7, "classifier.1": 9}
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, widths)
    wider = models.build("etn", **kwargs)
    new_spec = models.permutation_spec(wider)
    assert new_spec.widths() == {**spec.widths(), **widths}
    state = wider.state_dict()
    for group in new_spec:
        for ref in group.axes:
            assert state[ref.tensor].shape[ref.axis] == group.size, ref


def test_config_file_builds_the_default_model() -> None:
    options = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/etn.yaml"))
    assert isinstance(options, dict)
    assert options.pop("name") == "etn"
    model = models.build("etn", input_shape=(1, 28, 28), num_classes=10, **options)
    reference = models.build("etn", input_shape=(1, 28, 28), num_classes=10)
    assert model.fedsim_kwargs == reference.fedsim_kwargs
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

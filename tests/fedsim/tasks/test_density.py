"""Density task: dequantised data, bits per dimension, a federated flow run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsim import data, models, tasks
from fedsim.config import compose, from_dictconfig
from fedsim.data import digits as digits_module
from fedsim.data._dequantize import dequantize_pixels
from fedsim.exceptions import ConfigError, DataError
from fedsim.runner import run
from fedsim.tasks.density import Density
from fedsim.train import evaluate

# log N(0; 0, I_64) = -32 ln(2 pi) = -58.81206612509905 nats, so
# bpd = 32 ln(2 pi) / (64 ln 2) + log2 L = 0.5 log2(2 pi) + log2 L
HALF_LOG2_2PI = 1.3257480647361595
LOG2_17 = 4.087462841250339
# |x|^2 = 64 / 4 = 16 at x = +-1/2 adds 16 / 2 / (64 ln 2) = 0.18033688011112042
EDGE_TERM = 0.18033688011112042

DENSITY_RUN = [
    "task=density",
    "model=iresnet_flow",
    "model.hidden=[[8,8],[8,8]]",
    "dataset=digits",
    "dataset.dequantize=true",
    "task.levels=17",
    "client=adam",
    "client.lr=0.01",
    "num_clients=3",
    "simulation.engine=inprocess",
]


class StandardGaussian(nn.Module):
    """A "density model" with log p(x) = log N(x; 0, I) over its 64 values."""

    num_dims = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).double()
        return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _bound(levels: int) -> Density:
    return tasks.build("density", levels=levels).bind_model(StandardGaussian())


# -- dequantisation --------------------------------------------------------


def test_dequantised_values_keep_their_grey_level_and_lie_in_the_unit_bin() -> None:
    pixels = np.array([[0, 1, 16], [16, 7, 0]], dtype=np.float32)
    noisy = dequantize_pixels(pixels, levels=17, seed=3)
    assert noisy.dtype == np.float32 and noisy.shape == pixels.shape
    np.testing.assert_array_equal(np.floor(noisy), pixels)
    assert np.all(noisy < pixels + 1)
    np.testing.assert_array_equal(noisy, dequantize_pixels(pixels, levels=17, seed=3))
    assert not np.array_equal(noisy, dequantize_pixels(pixels, levels=17, seed=4))


def test_dequantisation_noise_is_uniform_on_the_unit_interval() -> None:
    noise = dequantize_pixels(np.zeros(40_000), levels=2, seed=0)
    # U[0, 1): mean 1/2 (standard error 0.0014), variance 1/12, quartiles 1/4 apart
    assert abs(noise.mean() - 0.5) < 0.006
    assert abs(noise.var() - 1 / 12) < 0.003
    counts = np.histogram(noise, bins=4, range=(0.0, 1.0))[0]
    assert np.all(np.abs(counts - 10_000) < 400)


def test_the_top_grey_level_stays_below_the_number_of_levels() -> None:
    # 255 + u rounds up to 256.0 in float32 for u within 2**-17 of 1
    noisy = dequantize_pixels(np.full(200_000, 255.0), levels=256, seed=0)
    assert float(noisy.max()) < 256.0


@pytest.mark.parametrize("bad", [0.5, -1.0, 17.0])
def test_values_that_are_not_grey_levels_are_refused(bad: float) -> None:
    with pytest.raises(DataError, match=r"integer grey levels 0..16"):
        dequantize_pixels(np.array([0.0, bad]), levels=17, seed=0)


def test_digits_dequantised_are_the_grey_levels_plus_noise_over_17() -> None:
    plain = data.load("digits", seed=0)
    deq = data.load("digits", seed=0, dequantize=True)
    images, _ = digits_module.source_arrays()
    # the same split: the labels agree and the grey levels come back exactly
    assert torch.equal(plain.train.y, deq.train.y)
    x = deq.train.x.double()
    assert float(x.min()) >= -0.5 and float(x.max()) < 0.5
    levels = torch.floor((x + 0.5) * 17)
    # the standardised copy holds (k / 16 - MEAN) / STD for grey level k
    k = plain.train.x.double() * digits_module.STD + digits_module.MEAN
    assert torch.allclose(levels, torch.round(k * 16))
    # hand-computed: grey level 16 lands in [16/17 - 1/2, 1/2) = [0.4412, 0.5)
    top = x[levels == 16]
    assert float(top.min()) >= 16 / 17 - 0.5 - 1e-7 and top.numel() > 1000
    # the noise is uniform across the bin: mean offset within the bin ~ 1/2
    offset = (x + 0.5) * 17 - levels
    assert abs(float(offset.mean()) - 0.5) < 0.01
    assert len(images) == len(deq.train) + len(deq.test)


# -- bits per dimension ----------------------------------------------------


@pytest.mark.parametrize(("levels", "log2_levels"), [(17, LOG2_17), (256, 8.0)])
def test_bpd_of_a_standard_gaussian_matches_the_closed_form(
    levels: int, log2_levels: float
) -> None:
    task = _bound(levels)
    x = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5)])
    values = task.metrics(StandardGaussian()(x), torch.zeros(2))
    expected = [HALF_LOG2_2PI + log2_levels, HALF_LOG2_2PI + EDGE_TERM + log2_levels]
    assert values["bpd"].tolist() == pytest.approx(expected, abs=1e-12)
    # nll is -log p in nats: 32 ln(2 pi) = 58.812066 and 8 more at |x|^2 = 16
    assert values["nll"].tolist() == pytest.approx([58.81206612509905, 66.812066125])
    assert torch.equal(task.loss(StandardGaussian()(x), torch.zeros(2)), values["nll"])


def test_a_zero_flow_is_a_standard_gaussian_with_the_closed_form_bpd() -> None:
    torch.manual_seed(0)
    flow = models.build(
        "iresnet_flow", input_shape=(1, 8, 8), num_classes=10, server_iterations=20
    ).double()
    with torch.no_grad():  # every branch g = 0; ActNorm and prior are identities
        for _, conv in flow.spectral_convs():
            conv.weight_orig.zero_()
            conv.bias.zero_()
    task = tasks.build("density", levels=17).bind_model(flow)
    assert task.num_dims == 64
    x = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), -0.5)]).double()
    flow.eval()
    bpd = task.metrics(flow(x), torch.zeros(2))["bpd"]
    expected = [HALF_LOG2_2PI + LOG2_17, HALF_LOG2_2PI + EDGE_TERM + LOG2_17]
    assert bpd.tolist() == pytest.approx(expected, abs=1e-10)


def test_an_unbound_task_reports_nll_only_and_labels_are_ignored() -> None:
    task = tasks.build("density", levels=17)
    log_p = torch.tensor([-3.0, 2.5])
    assert set(task.metrics(log_p, torch.tensor([0, 9]))) == {"nll"}
    assert task.loss(log_p, torch.tensor([4, 4])).tolist() == [3.0, -2.5]
    assert task.primary == "bpd" and not task.higher_is_better


def test_logits_are_refused_with_the_shape_named() -> None:
    with pytest.raises(ValueError, match=r"shape \(batch,\), got \(4, 10\)"):
        tasks.build("density").loss(torch.zeros(4, 10), torch.zeros(4))


def test_a_model_that_is_no_density_model_is_refused() -> None:
    mlp = models.build("mlp", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match=r"such as iresnet_flow; model 'mlp'"):
        tasks.build("density").bind_model(mlp)


@pytest.mark.parametrize("levels", [1, 0, 2.5, True])
def test_levels_must_be_an_integer_of_at_least_two(levels: object) -> None:
    with pytest.raises(ConfigError, match=r"task\.levels="):
        tasks.build("density", levels=levels)


def test_standardised_pixels_are_refused_through_the_config() -> None:
    exp = from_dictconfig(compose(["task=density", "dataset=digits"]))
    assert exp.task.options["dequantized"] is False
    with pytest.raises(ConfigError, match=r"set dataset\.dequantize=true"):
        tasks.build(exp.task.name, **exp.task.options)
    fine = from_dictconfig(compose(["task=density", "dataset.dequantize=true"]))
    assert tasks.build(fine.task.name, **fine.task.options).levels == 256


# -- evaluation and a federated run ----------------------------------------


def test_evaluation_in_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    flow = models.build("iresnet_flow", input_shape=(1, 8, 8), num_classes=10)
    test = data.load("digits", seed=0, dequantize=True).test
    task = tasks.build("density", levels=17).bind_model(flow)
    flow.train()
    flow(test.x[:64])  # initialise ActNorm from data, as a client would
    first = evaluate(flow, test.x, test.y, task, batch_size=100)
    second = evaluate(flow, test.x, test.y, task, batch_size=100)
    assert first == second
    # in train mode every pass draws new Hutchinson probes
    flow.train()
    with torch.no_grad():
        assert not torch.equal(flow(test.x[:8]), flow(test.x[:8]))


def test_the_probe_seed_fixes_the_eval_estimate_and_changes_it() -> None:
    x = data.load("digits", seed=0, dequantize=True).test.x[:16]

    def eval_log_p(seed: int) -> torch.Tensor:
        torch.manual_seed(0)  # same weights every time
        flow = models.build(
            "iresnet_flow", input_shape=(1, 8, 8), num_classes=10, seed=seed
        )
        flow.eval()
        with torch.no_grad():
            return flow(x)

    assert torch.equal(eval_log_p(1), eval_log_p(1))
    # other probes: every per-example estimate moves (torch's CPU generator keeps
    # only 32 bits of a seed, so a seed shifted past them would be ignored)
    assert not torch.isclose(eval_log_p(1), eval_log_p(2)).any()


def test_federated_density_run_lowers_the_test_bpd(tmp_path: Path) -> None:
    results = run(
        [*DENSITY_RUN, "num_rounds=3", f"output_dir={tmp_path / 'run'}"],
        progress=lambda r: None,
    )
    assert results.primary == "bpd" and not results.higher_is_better
    bpd = [r["test_bpd"] for r in results.rounds]
    assert len(bpd) == 4 and all(math.isfinite(b) for b in bpd)
    # the untrained flow (small contractive branches, identity ActNorm, standard
    # prior) scores close to a standard Gaussian on the same test images
    test = data.load("digits", seed=0, dequantize=True).test
    gaussian = evaluate(StandardGaussian(), test.x, test.y, _bound(17))["bpd"]
    assert abs(bpd[0] - gaussian) < 0.1
    # measured 5.52 -> 4.05 -> 3.76 -> 3.58
    assert bpd[1] < bpd[0] - 0.5 and bpd[3] < bpd[1] - 0.2
    assert results.final["best_test_bpd"] == min(bpd)

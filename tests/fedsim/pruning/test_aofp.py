"""AOFP: the decision rule, damage probes, oracle agreement, physical removal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedsim import models, tasks
from fedsim.config import ClientConfig
from fedsim.exceptions import ConfigError
from fedsim.pruning.aofp import AOFP, NEVER_SAMPLED, aofp_train, decide, mean_damage
from fedsim.pruning.flops import count_flops
from fedsim.pruning.groups import UnitMasks, prunable_groups, unprunable_groups
from fedsim.pruning.removal import remove_units
from fedsim.train import evaluate, local_train
from tests.support import SMALL_BUILD, example_input, outputs, perturb_state, to_float64

INPUT = (1, 8, 8)


def cnn(channels: list[int], hidden: list[int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build(
        "cnn", input_shape=INPUT, num_classes=10, channels=channels, hidden=hidden
    )


def batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the decision rule ------------------------------------------------------


def test_mean_damage_marks_unsampled_units() -> None:
    got = mean_damage(np.array([1.0, 0.0, 3.0]), np.array([2, 0, 3]))
    assert got.tolist() == [0.5, NEVER_SAMPLED, 1.0]


def test_decide_prunes_halves_or_resets() -> None:
    kept = np.arange(6)
    tbar = np.array([0.30, 0.01, 0.50, 0.02, 0.04, 0.90])
    # S = all 6, g = 3: the 3rd smallest (0.04) is below theta -> prune {1, 3, 4}
    d = decide(kept, tbar, theta=0.05, kept=kept)
    assert d.pruned.tolist() == [1, 3, 4]
    assert d.search.tolist() == [0, 2, 5]
    # theta 0.03: 0.04 is not below it -> S halves to the 3 lowest
    d = decide(kept, tbar, theta=0.03, kept=kept)
    assert d.pruned.size == 0 and d.search.tolist() == [1, 3, 4]
    # S of 3, g = 1: prune the lowest if below theta, else restart from kept
    d = decide(np.array([0, 2, 5]), tbar, theta=0.31, kept=kept)
    assert d.pruned.tolist() == [0] and d.search.tolist() == [1, 2, 3, 4, 5]
    d = decide(np.array([0, 2, 5]), tbar, theta=0.2, kept=kept)
    assert d.pruned.size == 0 and d.search.tolist() == kept.tolist()


# --- the damage probe -------------------------------------------------------


def test_damage_is_the_relative_change_of_the_followers_output() -> None:
    model = cnn([4, 6], [8]).double()
    perturb_state(model)
    model.eval()
    x = batch().double()
    group = prunable_groups(model, ["conv.0"])
    masks = UnitMasks(model, group)
    masks.ablate = {"conv.0": np.array([1, 3])}
    with masks.attached(), torch.no_grad():
        model(x)
    with torch.no_grad():
        y = torch.relu(model.bns[0](model.convs[0](x)))
        y = torch.nn.functional.max_pool2d(y, 2)
        keep = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=x.dtype).view(1, 4, 1, 1)
        z, z_ablated = model.convs[1](y), model.convs[1](y * keep)
    expected = float((z - z_ablated).pow(2).sum() / z.pow(2).sum())
    assert masks.damage["conv.0"] == pytest.approx(expected, rel=1e-12)


def test_zero_filters_cause_zero_damage() -> None:
    model = cnn([4, 6], [8])
    with torch.no_grad():
        for unit in (0, 2):
            model.convs[0].weight[unit] = 0
            model.bns[0].weight[unit] = 0
            model.bns[0].bias[unit] = 0
    model.eval()
    masks = UnitMasks(model, prunable_groups(model, ["conv.0"]))
    for ablate, zero in (([0, 2], True), ([0, 1], False)):
        masks.ablate = {"conv.0": np.array(ablate)}
        with masks.attached(), torch.no_grad():
            model(batch())
        assert (masks.damage["conv.0"] == 0.0) is zero


def test_probes_leave_the_output_unchanged_and_no_hook_behind() -> None:
    model = cnn([4, 6], [8])
    model.eval()
    x = batch()
    with torch.no_grad():
        before = model(x)
    masks = UnitMasks(model, prunable_groups(model))
    masks.ablate = {name: np.array([0, 1]) for name in masks.groups}
    with masks.attached(), torch.no_grad():
        during = model(x)
    assert torch.equal(before, during)
    assert set(masks.damage) == {"conv.0", "conv.1", "hidden.0"}
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


# --- agreement with oracle pruning ------------------------------------------


def oracle(model: torch.nn.Module, x: torch.Tensor, k: int) -> tuple[int, ...]:
    """The size-k subset of conv.0 whose ablation damages convs.1's output least."""
    masks = UnitMasks(model, prunable_groups(model, ["conv.0"]))
    damage = {}
    for subset in itertools.combinations(range(4), k):
        masks.ablate = {"conv.0": np.array(subset)}
        with masks.attached(), torch.no_grad():
            model(x)
        damage[subset] = masks.damage["conv.0"]
    ranked = sorted(damage, key=damage.__getitem__)
    assert damage[ranked[0]] < damage[ranked[1]]  # a unique oracle answer
    return ranked[0]


def layer_with_unequal_filters(seed: int) -> torch.nn.Module:
    """cnn with 4 conv.0 filters whose contributions to convs.1 differ in scale."""
    model = cnn([4, 6], [8], seed=seed)
    scales = torch.tensor([0.05, 0.4, 1.0, 2.0])
    order = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.convs[1].weight.mul_(scales[order].view(1, 4, 1, 1))
    return model.eval()


def run_search(model: torch.nn.Module, search: AOFP, x: torch.Tensor) -> None:
    with search.masks.attached(), torch.no_grad():
        for _ in range(500):
            if search.stopped:
                return
            search.before_step()
            model(x)
            search.after_step()
    raise AssertionError("the search never reached its FLOPs target")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_filters_agree_with_exhaustive_oracle(k: int, seed: int) -> None:
    model = layer_with_unequal_filters(seed)
    x = batch(32, seed)
    best = oracle(model, x, k)
    masks = UnitMasks(model, prunable_groups(model, ["conv.0"]))
    masks.ablate = {"conv.0": np.array(best)}
    with masks.attached(), torch.no_grad():
        model(x)
    # theta: k = 2 prunes at the first decision (S of 4, g = 2); k = 1 must halve
    # S first, then prune the single unit whose exact damage is below theta
    theta = 1e9 if k == 2 else 1.5 * masks.damage["conv.0"]
    probe = AOFP(
        model,
        generator=torch.Generator().manual_seed(seed),
        layers=["conv.0"],
        k=20,
        theta=theta,
        warmup=0,
    )
    narrow = probe.flops_at({"conv.0": 4 - k})
    probe.target_flops = (narrow + 1) / probe.initial_flops
    run_search(model, probe, x)
    pruned = [tuple(units.tolist()) for _, _, units in probe.pruned_at]
    assert pruned == [best]


def test_planted_zero_filters_are_pruned_first_and_each_miss_halves_s() -> None:
    model = cnn([8, 6], [8], seed=3)
    planted = [2, 5]
    with torch.no_grad():
        for unit in planted:
            model.convs[0].weight[unit] = 0
            model.bns[0].weight[unit] = 0
            model.bns[0].bias[unit] = 0
    model.eval()
    search = AOFP(
        model,
        generator=torch.Generator().manual_seed(0),
        layers=["conv.0"],
        k=10,
        theta=1e-6,
        warmup=0,
    )
    state = search.searches["conv.0"]
    sizes = [len(state.search)]
    x = batch(16)
    with search.masks.attached(), torch.no_grad():
        while not search.pruned_at:
            search.before_step()
            model(x)
            search.after_step()
            if search.iteration % 10 == 0 and not search.pruned_at:
                sizes.append(len(state.search))
    assert sizes == [8, 4, 2]  # no pruning yet: S halves every cycle
    assert set(search.pruned_at[0][2].tolist()) <= set(planted)


def test_flops_stop_condition_fires() -> None:
    model = cnn([8, 6], [8])
    model.eval()
    search = AOFP(
        model,
        generator=torch.Generator().manual_seed(0),
        layers=["conv.0"],
        k=5,
        theta=1e9,  # every decision prunes half of S
        warmup=0,
        target_flops=0.6,
    )
    flops_before_last = search.flops
    history = []
    with search.masks.attached(), torch.no_grad():
        for _ in range(100):
            if not search.stopped:
                flops_before_last = search.flops
            search.before_step()
            model(batch())
            search.after_step()
            history.append(search.flops)
    assert search.stopped
    assert search.flops <= 0.6 * search.initial_flops < flops_before_last
    assert len(search.pruned_at) >= 1
    # after the stop nothing is ablated or pruned any more
    last_prune = search.pruned_at[-1][0]
    assert all(f == search.flops for f in history[last_prune:])
    exported, _ = search.export(model.state_dict())
    assert count_flops(exported) == search.flops


# --- FLOPs and physical removal ---------------------------------------------


def test_flops_counter_matches_the_hand_formula() -> None:
    c0, c1, h = 6, 5, 7
    model = cnn([c0, c1], [h])
    conv0 = 8 * 8 * c0 * (1 * 9)
    conv1 = 4 * 4 * c1 * (c0 * 9)
    assert count_flops(model) == conv0 + conv1 + h * (c1 * 2 * 2) + 10 * h
    mlp = models.build("mlp", input_shape=INPUT, num_classes=10, hidden=[20, 9])
    assert count_flops(mlp) == 64 * 20 + 20 * 9 + 9 * 10


@pytest.mark.parametrize(
    ("group", "drop"),
    [
        # conv rows (1*9) + BN weight and bias + next conv's input columns (c1*9)
        ("conv.0", lambda c0, c1, h: 9 + 2 + c1 * 9),
        # conv rows (c0*9) + BN + the head's channel-major blocks (2*2 per channel)
        ("conv.1", lambda c0, c1, h: c0 * 9 + 2 + 4 * h),
        # a hidden unit: its row (c1*4) and bias, and its column of the output layer
        ("hidden.0", lambda c0, c1, h: c1 * 4 + 1 + 10),
    ],
)
def test_pruned_model_is_smaller_by_the_formula(group: str, drop) -> None:
    c0, c1, h, k = 6, 5, 7, 2
    model = cnn([c0, c1], [h])
    size = {"conv.0": c0, "conv.1": c1, "hidden.0": h}[group]
    keep = np.setdiff1d(np.arange(size), [1, size - 1])
    pruned, state = remove_units(model, model.state_dict(), {group: keep})
    assert num_params(model) - num_params(pruned) == k * drop(c0, c1, h)
    assert models.permutation_spec(pruned).widths()[group] == size - k
    assert set(state) == set(pruned.state_dict())
    x = batch(3)
    assert pruned(x).shape == model(x).shape == (3, 10)


def test_pruned_network_equals_masked_network_in_eval_mode() -> None:
    model = cnn([8, 6], [12])
    perturb_state(model)
    model.eval()
    groups = prunable_groups(model)
    masks = UnitMasks(model, groups)
    rng = np.random.default_rng(0)
    keep = {}
    for name, g in groups.items():
        mask = np.ones(g.size, dtype=bool)
        mask[rng.choice(g.size, g.size // 2, replace=False)] = False
        masks.set_keep(name, mask)
        keep[name] = np.flatnonzero(mask)
    x = batch(10)
    with masks.attached(), torch.no_grad():
        masked = model(x)
    pruned, _ = remove_units(model, model.state_dict(), keep)
    pruned.eval()
    with torch.no_grad():
        assert (pruned(x) - masked).abs().max() < 1e-5
        assert (model(x) - masked).abs().max() > 1e-2  # the masks did something


@pytest.mark.parametrize("name", models.names())
def test_every_prunable_group_of_the_library_removes_like_its_mask(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name, **SMALL_BUILD).double()
    perturb_state(model)
    model.eval()
    x = to_float64(example_input(model, batch=4))
    for group, g in prunable_groups(model).items():
        masks = UnitMasks(model, {group: g})
        mask = np.ones(g.size, dtype=bool)
        mask[[0, g.size - 1]] = False
        masks.set_keep(group, mask)
        with masks.attached(), torch.no_grad():
            masked = outputs(model, x)
        pruned, _ = remove_units(
            model, model.state_dict(), {group: np.flatnonzero(mask)}
        )
        pruned.eval()
        with torch.no_grad():
            got = outputs(pruned, x)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, masked, strict=True))
        assert diff < 1e-9, f"{name}/{group}"
        assert num_params(pruned) < num_params(model)


def test_which_library_models_aofp_can_prune() -> None:
    def reasons(name: str) -> dict[str, str]:
        return unprunable_groups(models.build(name, **SMALL_BUILD))

    for name in ("cnn", "mlp", "etn"):
        assert reasons(name) == {}, name
    assert set(reasons("gen")) == {"latent", "nodes"}
    assert "tied" in reasons("gen")["latent"]
    assert "fixed" in reasons("gen")["nodes"]
    for name in ("groupsort_mlp", "iresnet", "lego_cnn", "selective_resnet"):
        model = models.build(name, **SMALL_BUILD)
        assert not prunable_groups(model), name
    assert all("not an averaged" in r for r in reasons("iresnet").values())
    with pytest.raises(ConfigError, match=r"group 'latent' cannot be pruned: .*tied"):
        prunable_groups(models.build("gen", **SMALL_BUILD), ["latent"])
    with pytest.raises(ConfigError, match=r"'conv\.7', which is not a group"):
        prunable_groups(cnn([4, 6], [8]), ["conv.7"])


# --- training with AOFP -----------------------------------------------------


def digits() -> tuple[torch.Tensor, ...]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_masks_never_leak_into_exported_weights() -> None:
    x, y, _, _ = digits()
    model = cnn([8, 8], [16])
    search = AOFP(
        model,
        generator=torch.Generator().manual_seed(0),
        k=4,
        theta=1e9,
        warmup=0,
        target_flops=0.6,
    )
    cfg = ClientConfig(lr=0.05, momentum=0.9, epochs=1, batch_size=64)
    task = tasks.build("classification")
    result = aofp_train(
        model, x[:512], y[:512], cfg, task, search=search, generator=torch.Generator()
    )
    assert search.stopped
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )
    exported, state = search.export(result.state_dict)
    widths = search.widths()
    fresh = models.build(
        "cnn",
        **models.rebuild_kwargs(
            model.fedsim_kwargs, models.permutation_spec(model), widths
        ),
    ).state_dict()
    assert list(state) == list(fresh) == list(exported.state_dict())
    assert all(state[k].shape == fresh[k].shape for k in fresh)
    assert not any("mask" in k for k in state)
    # kept units carry their trained values, nothing else
    keep = np.flatnonzero(search.searches["conv.0"].keep)
    trained = result.state_dict["convs.0.weight"]
    assert torch.equal(state["convs.0.weight"], trained[torch.as_tensor(keep)])


def test_aofp_training_on_digits_prunes_half_the_flops_and_keeps_accuracy() -> None:
    xtr, ytr, xte, yte = digits()
    model = cnn([12, 16], [32])
    task = tasks.build("classification")
    generator = torch.Generator().manual_seed(0)
    search = AOFP(
        model,
        generator=torch.Generator().manual_seed(1),
        k=30,
        theta=0.1,
        warmup=20,
        target_flops=0.5,
    )
    cfg = ClientConfig(lr=0.05, momentum=0.9, epochs=8, batch_size=32)
    before = evaluate(model, xte, yte, task)
    result = aofp_train(model, xtr, ytr, cfg, task, search=search, generator=generator)
    assert search.stopped and result.num_steps == 8 * math.ceil(1400 / 32)
    pruned, _ = search.export(result.state_dict)
    assert count_flops(pruned) <= 0.5 * count_flops(model)
    assert num_params(pruned) < num_params(model)
    tuned = local_train(pruned, xtr, ytr, cfg, task, generator=generator)
    pruned.load_state_dict(tuned.state_dict)
    after = evaluate(pruned, xte, yte, task)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.9


def test_aofp_refuses_a_model_with_nothing_to_prune() -> None:
    model = models.build("groupsort_mlp", **SMALL_BUILD)
    with pytest.raises(ConfigError, match="no group AOFP can prune"):
        AOFP(model, generator=torch.Generator())

"""Unit tests of the permutation-spec primitives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import models
from fedsim.matching.permspec import (
    AxisRef,
    PermGroup,
    PermutationSpec,
    permute_state_dict,
    select_units,
    unit_indices,
)


def test_unit_indices_contiguous_blocks_and_strided_bundles() -> None:
    # GroupSort-style blocks of 2 rows: unit 1 -> rows 2, 3
    assert unit_indices(AxisRef("w", block=2), 3, [1]).tolist() == [2, 3]
    # LegoNet-style bundles: 2 fragments of 3 channels, unit 1 -> channels 1 and 4
    assert unit_indices(AxisRef("w", repeat=2), 3, [1]).tolist() == [1, 4]
    # a slice at offset 5 of a concatenated axis
    assert unit_indices(AxisRef("w", offset=5), 3, [0, 2]).tolist() == [5, 7]


def test_permute_moves_blocks_and_relabels_pointers() -> None:
    w = torch.arange(6.0)
    p = torch.tensor([2, -1, 0])
    spec = PermutationSpec(
        (PermGroup("g", 3, (AxisRef("w", 0, block=2), AxisRef("p", values=True))),)
    )
    out = permute_state_dict({"w": w, "p": p}, spec, {"g": np.array([2, 0, 1])})
    assert out["w"].tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0]
    # old unit 2 is new unit 0, old unit 0 is new unit 1
    assert out["p"].tolist() == [0, -1, 1]


def test_a_bad_permutation_is_refused() -> None:
    spec = PermutationSpec((PermGroup("g", 3, (AxisRef("w"),)),))
    with pytest.raises(ValueError, match="must reorder"):
        permute_state_dict({"w": torch.zeros(3)}, spec, {"g": np.array([0, 0, 1])})


def test_select_units_equals_the_narrower_mlp_on_kept_units() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=[6, 5])
    spec = models.permutation_spec(model)
    keep = np.array([4, 0, 3])
    state = select_units(model.state_dict(), spec, "hidden.0", keep)
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, {"hidden.0": 3})
    assert kwargs["hidden"] == [3, 5]
    small = models.build("mlp", **kwargs)
    small.load_state_dict(state)
    # zeroing the dropped units' outgoing weights gives the same function
    with torch.no_grad():
        dropped = [i for i in range(6) if i not in keep]
        model.layers[1].weight[:, dropped] = 0.0
    x = torch.randn(7, 1, 4, 4)
    torch.testing.assert_close(small(x), model(x))


def test_select_units_on_strided_bundles_and_pointers() -> None:
    w = torch.arange(6.0)  # 2 fragments x 3 units
    p = torch.tensor([2, 1, -1])
    spec = PermutationSpec(
        (PermGroup("g", 3, (AxisRef("w", repeat=2), AxisRef("p", values=True))),)
    )
    out = select_units({"w": w, "p": p}, spec, "g", np.array([2, 0]))
    assert out["w"].tolist() == [2.0, 0.0, 5.0, 3.0]
    assert out["p"].tolist() == [0, -1, -1]


def test_rebuild_refuses_to_resize_a_fixed_group() -> None:
    spec = PermutationSpec((PermGroup("g", 3, (AxisRef("w"),), width_key=None),))
    with pytest.raises(ValueError, match="fixed width"):
        models.rebuild_kwargs({}, spec, {"g": 4})


def test_widths_of_groups_whose_tensor_is_absent_stay_as_built() -> None:
    model = models.build("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=[6, 5])
    spec = models.permutation_spec(model)
    state = {k: v for k, v in model.state_dict().items() if k != "layers.0.weight"}
    state["layers.1.weight"] = torch.zeros(7, 6)
    state["layers.1.bias"] = torch.zeros(7)
    widths = models.infer_widths(spec, state, model.state_dict())
    assert widths == {"hidden.0": 6, "hidden.1": 7}

"""State dicts and Flower records convert both ways without loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.params import array_to_numpy, record_to_state, split_roles, state_to_record

CASES = [
    np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
    np.arange(5),
    np.asfortranarray(np.random.default_rng(1).normal(size=(3, 4))),
    np.array(3.0, dtype=np.float32),
    np.zeros((0, 3)),
    np.array([True, False]),
    np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2],
]


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_array_to_numpy_equals_flowers_own_decoder(value: np.ndarray) -> None:
    arr = Array(value)
    fast = array_to_numpy(arr)
    slow = arr.numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


def test_state_round_trip_and_roles() -> None:
    state = {
        "w": torch.randn(4, 3),
        "b": torch.randn(4),
        "n": torch.tensor(7),
        "p": torch.randn(2),
    }
    back = record_to_state(state_to_record(state))
    for key, value in state.items():
        assert torch.equal(back[key], value)
    back["w"][0, 0] = 1.0  # writable copies
    parts = split_roles(state, {"p": "local"})
    assert set(parts["average"]) == {"w", "b"}
    assert set(parts["server"]) == {"n"}  # integer tensors are never averaged
    assert set(parts["local"]) == {"p"}
    assert isinstance(state_to_record(state, ["w"]), ArrayRecord)

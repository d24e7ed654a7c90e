"""State dicts and Flower records convert both ways without loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.params import (
    NpyArray,
    array_to_numpy,
    numpy_to_array,
    record_to_state,
    split_roles,
    state_to_record,
)

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


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_numpy_to_array_is_byte_identical_to_flowers_encoder(
    value: np.ndarray,
) -> None:
    plain = Array(value)
    for _ in range(2):  # the second call reuses the cached header
        fast = numpy_to_array(value)
        assert isinstance(fast, NpyArray)
        assert (fast.dtype, fast.shape, fast.stype, fast.data) == (
            plain.dtype,
            plain.shape,
            plain.stype,
            plain.data,
        )
        # built without Array.__init__, yet in the state __init__ leaves
        assert vars(fast) == vars(plain)


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_npy_array_decodes_like_np_load_into_a_writable_copy(
    value: np.ndarray,
) -> None:
    fast = numpy_to_array(value)
    decoded, reference = fast.numpy(), Array(value).numpy()
    assert decoded.dtype == reference.dtype and decoded.shape == reference.shape
    np.testing.assert_array_equal(decoded, reference)
    assert decoded.flags.writeable
    if decoded.size:
        decoded.reshape(-1)[0] = 1  # a copy: the Array's bytes stay as they were
        np.testing.assert_array_equal(fast.numpy(), reference)


def test_npy_array_travels_as_a_plain_flower_array() -> None:
    """Flower names the class in an object's serialised form; an NpyArray must
    serialise, hash and inflate exactly as the Array it equals, or a SuperLink
    could not read fedsim's replies."""
    value = np.random.default_rng(2).normal(size=(300, 70)).astype(np.float32)
    fast, plain = numpy_to_array(value), Array(value)
    assert fast.deflate() == plain.deflate()
    assert fast.object_id == plain.object_id
    back = Array.inflate(fast.deflate(), fast.children)
    assert type(back) is Array and back.data == plain.data

"""Carrying clients' assignments over to a new atom numbering (hand-computed)."""

from __future__ import annotations

import numpy as np

from fedsim.matching.assignments import atom_map, carry_over, carry_over_clients


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_atom_map_follows_the_majority_of_the_participants() -> None:
    # old atom 0 -> new 1 (twice), old 1 -> new 0, old 2 -> new 3 (twice),
    # old 3 was held by no participant
    sent = [ints(0, 1, 2), ints(0, 2)]
    matched = [ints(1, 0, 3), ints(1, 3)]
    np.testing.assert_array_equal(atom_map(sent, matched, 4, 4), ints(1, 0, 3, -1))


def test_atom_map_breaks_ties_towards_the_lowest_new_atom() -> None:
    sent = [ints(0, 1), ints(0, 1), ints(0, 1)]
    matched = [ints(2, 0), ints(1, 0), ints(2, 3)]  # old 0: new 2 twice; old 1: 0
    np.testing.assert_array_equal(atom_map(sent, matched, 2, 4), ints(2, 0))
    tie = atom_map([ints(0), ints(0)], [ints(2), ints(1)], 1, 3)
    np.testing.assert_array_equal(tie, ints(1))


def test_carry_over_fills_orphans_with_the_most_popular_free_atoms() -> None:
    mapping = ints(1, 0, 1, -1)  # old 0 -> 1, 1 -> 0, 2 -> 1, 3 -> none
    counts = ints(5, 2, 0, 7)
    # unit 0: old 0 -> 1; unit 1: old 3 has no successor; unit 2: old 2 -> 1, taken.
    # Free atoms by popularity: 3 (7), 0 (5), 2 (0) -> units 1, 2 get 3 and 0.
    np.testing.assert_array_equal(
        carry_over(ints(0, 3, 2), mapping, counts), ints(1, 3, 0)
    )


def test_carry_over_keeps_a_clean_mapping_unchanged() -> None:
    mapping = ints(2, 0, 1)
    np.testing.assert_array_equal(
        carry_over(ints(1, 2, 0), mapping, ints(1, 1, 1)), ints(0, 1, 2)
    )


def test_a_client_wider_than_the_new_layer_cannot_be_carried() -> None:
    assert (
        carry_over(ints(0, 1, 2, 3, 4), ints(0, 1, 2, 3, 3), ints(1, 1, 1, 1)) is None
    )


def test_carried_assignments_are_injective_and_in_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        old_width, new_width = rng.integers(3, 12, size=2)
        n = int(rng.integers(1, min(old_width, new_width) + 1))
        old = rng.permutation(old_width)[:n]
        mapping = rng.integers(-1, new_width, size=old_width)
        counts = rng.integers(0, 5, size=new_width)
        out = carry_over(old, mapping, counts)
        assert out is not None and len(out) == n
        assert len(np.unique(out)) == n and out.min() >= 0 and out.max() < new_width
        # a unit whose successor is unique to it keeps that successor
        for unit, atom in enumerate(mapping[old]):
            if atom >= 0 and (mapping[old[:unit]] != atom).all():
                assert out[unit] == atom


def test_carry_over_clients_moves_every_group_and_drops_clients_that_do_not_fit() -> (
    None
):
    # participant 0 was sent old atoms [0, 1, 2] (group a) and [1, 0] (group b)
    sent = {0: {"a": ints(0, 1, 2), "b": ints(1, 0)}}
    matched = {0: {"a": ints(2, 0, 1), "b": ints(0, 1)}}  # a: 0->2 1->0 2->1; b swaps
    absent = {
        5: {"a": ints(2, 0), "b": ints(0)},  # -> a: [1, 2], b: [1]
        6: {"a": ints(0, 1, 2), "b": ints(0, 1, 2)},  # b: 3 units, new b has 2 atoms
    }
    out = carry_over_clients(absent, {"a": 3, "b": 3}, sent, matched, {"a": 3, "b": 2})
    assert set(out) == {5}
    np.testing.assert_array_equal(out[5]["a"], ints(1, 2))
    np.testing.assert_array_equal(out[5]["b"], ints(1))
    assert carry_over_clients(absent, {"a": 3, "b": 3}, {}, matched, {"a": 3}) == {}

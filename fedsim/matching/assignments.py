"""Keeping clients' unit-to-atom assignments valid from one matching to the next.

In PFNM with communication every client trains its own *slice* of the global
model: the global units (atoms) its own units were matched to. Each round the
server matches again, starting from the atoms each participant was sent, and
the atoms are renumbered (some close, some open). A client that was not
sampled, or whose reply failed, keeps its previous assignment, which is
written in the old numbering; :func:`atom_map` and :func:`carry_over` move it
to the new one.

``atom_map`` follows the participants: for every old atom, the new atom that
most of the participants' units sent as that old atom were matched to.
``carry_over`` maps a client's units through it; a unit whose old atom has no
successor (only absent clients held it) or whose successor another of the
client's units already took is given the most popular new atom the client
does not hold yet, so the client keeps its width and its slice stays injective
(a client wider than the new global layer loses its assignment instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["atom_map", "carry_over", "carry_over_clients"]

I64 = NDArray[np.int64]
Units = Mapping[str, I64]  # group name -> an atom per unit of one client


def atom_map(
    sent: Sequence[I64], matched: Sequence[I64], old_width: int, new_width: int
) -> I64:
    """For every old atom, the new atom its units most often went to (``-1``: none).

    Parameters
    ----------
    sent : sequence of int arrays
        For each participant, the old atom each of its units was sent as.
    matched : sequence of int arrays
        For each participant, the new atom each unit was matched to (same shapes).
    old_width, new_width : int
        Number of old and new atoms.

    Returns
    -------
    ndarray of int64, shape (old_width,)
        Ties go to the lowest new atom.
    """
    votes = np.zeros((old_width, new_width), dtype=np.int64)
    for before, after in zip(sent, matched, strict=True):
        np.add.at(votes, (np.asarray(before), np.asarray(after)), 1)
    out = votes.argmax(1).astype(np.int64)
    out[votes.max(1, initial=0) == 0] = -1
    return out


def carry_over(assignment: I64, mapping: I64, counts: I64) -> I64 | None:
    """A client's assignment moved to the new atoms, injective, same length.

    Parameters
    ----------
    assignment : int array
        The client's old atom per unit.
    mapping : int array
        :func:`atom_map`'s result.
    counts : int array
        Units assigned to each new atom this round (its popularity).

    Returns
    -------
    ndarray of int64 or None
        New atom per unit; units without a successor get the most popular free
        atoms (lowest index among ties). ``None`` when the client has more
        units than there are new atoms (the global layer shrank below it).
    """
    if len(assignment) > len(counts):
        return None
    new = mapping[np.asarray(assignment, dtype=np.int64)]
    out = np.full(len(new), -1, dtype=np.int64)
    taken = np.zeros(len(counts), dtype=bool)
    for unit, atom in enumerate(new):
        if atom >= 0 and not taken[atom]:
            out[unit] = atom
            taken[atom] = True
    orphans = np.flatnonzero(out < 0)
    if len(orphans):
        free = np.flatnonzero(~taken)
        by_popularity = free[np.argsort(-np.asarray(counts)[free], kind="stable")]
        out[orphans] = by_popularity[: len(orphans)]
    return out


def carry_over_clients(
    absent: Mapping[int, Units],
    old_widths: Mapping[str, int],
    sent: Mapping[int, Units],
    matched: Mapping[int, Units],
    new_widths: Mapping[str, int],
) -> dict[int, dict[str, I64]]:
    """Every absent client's assignment in the new numbering, group by group.

    Parameters
    ----------
    absent : mapping of client to its assignment per group
        Clients that took no part in the new matching (old numbering).
    old_widths, new_widths : mapping of group to int
        Global widths before and after the matching.
    sent : mapping of client to units per group
        For the participants whose units correspond to the old atoms, the old
        atom each unit was sent as.
    matched : mapping of client to assignment per group
        Every participant's new assignment.

    Returns
    -------
    dict
        The absent clients that could be carried over (see :func:`carry_over`);
        none when no participant's units correspond to the old atoms.
    """
    voters = [c for c in sent if c in matched]
    if not voters:
        return {}
    out: dict[int, dict[str, I64]] = {c: {} for c in absent}
    for g, width in new_widths.items():
        mapping = atom_map(
            [sent[c][g] for c in voters],
            [matched[c][g] for c in voters],
            old_widths[g],
            width,
        )
        counts = np.bincount(
            np.concatenate([np.asarray(a[g]) for a in matched.values()]),
            minlength=width,
        ).astype(np.int64)
        for c, old in absent.items():
            if c in out:
                moved = carry_over(old[g], mapping, counts)
                if moved is None:
                    del out[c]
                else:
                    out[c][g] = moved
    return out

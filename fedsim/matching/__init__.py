"""Pure numpy/scipy/torch matching math: permutation specs, PFNM, FedMA steps."""

from fedsim.matching.permspec import (
    AxisRef,
    PermGroup,
    PermutationSpec,
    permute_state_dict,
    random_permutations,
    select_units,
    unit_indices,
)

__all__ = [
    "AxisRef",
    "PermGroup",
    "PermutationSpec",
    "permute_state_dict",
    "random_permutations",
    "select_units",
    "unit_indices",
]

"""Pure numpy/scipy/torch matching math: permutation specs, PFNM, FedMA steps."""

from fedsim.matching.bbp import (
    MatchResult,
    match_units,
    reference_max_new,
    rematch_scores,
)
from fedsim.matching.match import global_model, match, slice_for_client
from fedsim.matching.permspec import (
    AxisRef,
    PermGroup,
    PermutationSpec,
    permute_state_dict,
    random_permutations,
    select_units,
    unit_indices,
)
from fedsim.matching.pfnm import PFNMResult, pfnm_mlp, pfnm_mlp_with_assignments

__all__ = [
    "AxisRef",
    "MatchResult",
    "PFNMResult",
    "PermGroup",
    "PermutationSpec",
    "global_model",
    "match",
    "match_units",
    "permute_state_dict",
    "pfnm_mlp",
    "pfnm_mlp_with_assignments",
    "random_permutations",
    "reference_max_new",
    "rematch_scores",
    "select_units",
    "slice_for_client",
    "unit_indices",
]

"""Structured pruning: AOFP filter pruning driven by permutation specs.

:mod:`fedsim.pruning.aofp` holds the search, :mod:`fedsim.pruning.groups` which
units a model's spec lets AOFP prune and their masking,
:mod:`fedsim.pruning.removal` their physical removal,
:mod:`fedsim.pruning.flops` the FLOPs counter, and
:mod:`fedsim.pruning.federated` the client- and server-side use in federated
training (``client.pruning.*``).
"""

from fedsim.pruning.aofp import AOFP, AOFP_RECORD, aofp_train, decide
from fedsim.pruning.flops import count_flops
from fedsim.pruning.groups import (
    PrunableGroup,
    UnitMasks,
    prunable_groups,
    unprunable_groups,
)
from fedsim.pruning.removal import remove_units

__all__ = [
    "AOFP",
    "AOFP_RECORD",
    "PrunableGroup",
    "UnitMasks",
    "aofp_train",
    "count_flops",
    "decide",
    "prunable_groups",
    "remove_units",
    "unprunable_groups",
]

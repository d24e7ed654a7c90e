"""The one place where torch state dicts meet Flower records.

Strategies aggregate only the ``average``-role tensors of a model (see
:func:`fedsim.models.tensor_roles`); non-floating tensors such as BatchNorm's
``num_batches_tracked`` are never averaged and travel as server-owned state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.models import Role

__all__ = [
    "SERVER_STATE_KEY",
    "array_to_numpy",
    "config_value",
    "payload_bytes",
    "record_to_state",
    "split_roles",
    "state_to_record",
]

#: RecordDict key under which server-owned tensors ride along with the model
SERVER_STATE_KEY = "fedsim.server"


def state_to_record(
    state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` (restricted to ``keys``), key order kept."""
    chosen = list(state) if keys is None else list(keys)
    return ArrayRecord({k: state[k].detach().cpu() for k in chosen})


def array_to_numpy(arr: Array) -> np.ndarray:
    """A read-only numpy view of a Flower ``Array``.

    Flower stores numpy arrays as ``.npy`` bytes; ``Array.numpy()`` re-parses
    the text header with ``np.load`` every time (a quarter of a millisecond per
    tensor). The array's dtype and shape are stored beside the bytes, so for the
    common version-1, C-order layout this reads the data straight after the
    header; anything else goes through ``Array.numpy()``.
    """
    data = arr.data
    if arr.stype == "numpy.ndarray" and data[:8] == b"\x93NUMPY\x01\x00":
        header_len = int.from_bytes(data[8:10], "little")
        header = data[10 : 10 + header_len]
        if b"'fortran_order': False" in header:
            offset = 10 + header_len
            flat = np.frombuffer(data, dtype=np.dtype(arr.dtype), offset=offset)
            return flat.reshape(arr.shape)
    return arr.numpy()


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Torch tensors from an ``ArrayRecord`` (writable copies, CPU)."""
    return {
        k: torch.from_numpy(np.array(array_to_numpy(arr), copy=True))
        for k, arr in record.items()
    }


def split_roles(
    state: Mapping[str, torch.Tensor], roles: Mapping[str, Role]
) -> dict[Role, dict[str, torch.Tensor]]:
    """Split a state dict by federated role (non-float tensors count as ``server``)."""
    out: dict[Role, dict[str, torch.Tensor]] = {
        "average": {},
        "server": {},
        "local": {},
    }
    for key, value in state.items():
        role = roles.get(key, "average")
        if role == "average" and not value.is_floating_point():
            role = "server"
        out[role][key] = value
    return out


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data a message carries (the serialised arrays)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values())
    return total


def config_value(
    config: ConfigRecord | MetricRecord | None, key: str, default: Any
) -> Any:
    """``config[key]`` if present, else ``default``."""
    if config is None or key not in config:
        return default
    return config[key]

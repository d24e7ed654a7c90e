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
    "NpyArray",
    "array_to_numpy",
    "config_value",
    "numpy_to_array",
    "payload_bytes",
    "record_to_state",
    "split_roles",
    "state_to_record",
]

#: RecordDict key under which server-owned tensors ride along with the model
SERVER_STATE_KEY = "fedsim.server"


class NpyArray(Array):
    """A Flower ``Array`` whose :meth:`numpy` skips ``np.load``'s header parse.

    Flower stores numpy arrays as ``.npy`` bytes and ``Array.numpy()`` runs
    ``np.load``, which parses the text header with ``ast.literal_eval`` every
    time: most of the cost of FedAvg over many small tensors (25 ms against
    13 ms for 100 replies of the default MLP). The dtype and shape are stored
    beside the bytes, so for the usual version-1, C-order layout this reads the
    data straight after the header. Like ``np.load`` it returns a new, writable
    array; anything else goes through ``Array.numpy()``. fedsim builds its
    records from these (:func:`numpy_to_array`); to Flower they are Arrays.
    """

    def numpy(self) -> np.ndarray:
        view = _npy_view(self)
        return Array.numpy(self) if view is None else view.copy()

    def deflate(self) -> bytes:
        """Flower's serialised form of the plain ``Array`` (Flower names the
        class in it, and every Flower runtime must inflate it as an Array)."""
        plain = Array(
            dtype=self.dtype, shape=self.shape, stype=self.stype, data=self.data
        )
        plain.__dict__["_chunks"] = self.slice_array()  # already hashed
        return plain.deflate()

    @classmethod
    def of(cls, dtype: str, shape: tuple[int, ...], data: bytes) -> NpyArray:
        """The NpyArray ``NpyArray(dtype, shape, "numpy.ndarray", data)`` gives,
        without ``Array.__init__``'s argument dispatch and per-field
        ``__setattr__`` (most of the cost of building a reply of a few tensors);
        ``shape`` must be a tuple of ints and ``data`` bytes."""
        arr = cls.__new__(cls)
        fields = arr.__dict__
        fields["dtype"] = dtype
        fields["shape"] = shape
        fields["stype"] = "numpy.ndarray"
        fields["data"] = data
        fields["_is_dirty"] = True  # as after __init__: never deflated
        return arr


#: ``.npy`` headers and dtype names by (dtype, shape): a model's tensors have
#: few shapes
_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}
_MAX_HEADERS = 4096


def numpy_to_array(values: np.ndarray) -> NpyArray:
    """An :class:`NpyArray` of ``values``, byte for byte what ``Array(values)`` gives.

    ``Array(values)`` runs ``np.save``, which formats the text header anew for
    every tensor; a client's reply of a few small tensors spends most of its
    encoding time there. The header depends only on the dtype and shape, so it
    is formatted once per (dtype, shape) and reused; the data follows it as the
    raw C-order bytes, exactly as ``np.save`` writes them. Non-contiguous arrays
    go through ``Array(values)``.
    """
    if not values.flags.c_contiguous or values.dtype.hasobject:
        plain = Array(values)
        return NpyArray(plain.dtype, plain.shape, plain.stype, plain.data)
    shape = tuple(int(n) for n in values.shape)
    key = (values.dtype.str, shape)
    known = _NPY_HEADERS.get(key)
    if known is None:
        plain = Array(values)
        if len(_NPY_HEADERS) >= _MAX_HEADERS:
            _NPY_HEADERS.clear()
        known = (plain.data[: len(plain.data) - values.nbytes], plain.dtype)
        _NPY_HEADERS[key] = known
    header, dtype = known
    return NpyArray.of(dtype, shape, b"".join((header, values.data)))


def state_to_record(
    state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` (restricted to ``keys``), key order kept."""
    chosen = list(state) if keys is None else list(keys)
    record = ArrayRecord()  # filled in place: ArrayRecord(dict) copies each Array
    for k in chosen:
        record[k] = numpy_to_array(state[k].detach().cpu().numpy())
    return record


def array_to_numpy(arr: Array) -> np.ndarray:
    """A read-only numpy view of a Flower ``Array`` (no header parse, no copy;
    see :class:`NpyArray`); layouts other than version-1 C-order ``.npy`` go
    through ``Array.numpy()``."""
    view = _npy_view(arr)
    return Array.numpy(arr) if view is None else view


def _npy_view(arr: Array) -> np.ndarray | None:
    """The array's data as a read-only view, if its bytes are a version-1,
    C-order ``.npy`` file; else ``None``."""
    data = arr.data
    if arr.stype != "numpy.ndarray" or data[:8] != b"\x93NUMPY\x01\x00":
        return None
    header_len = int.from_bytes(data[8:10], "little")
    if b"'fortran_order': False" not in data[10 : 10 + header_len]:
        return None
    offset = 10 + header_len
    flat = np.frombuffer(data, dtype=np.dtype(arr.dtype), offset=offset)
    return flat.reshape(arr.shape)


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

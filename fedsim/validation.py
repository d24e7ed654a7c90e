"""Screening of client replies before they reach a strategy.

A reply is rejected, with a reason, when its update could corrupt the global
model: no ``arrays`` record, missing or extra keys, a shape that differs from
the global model's (unless the strategy matches models of different widths),
a non-floating dtype, a NaN or Inf, or an example count that is not a positive
number below ``max_examples``.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedsim.params import array_to_numpy

__all__ = ["check_reply"]


def check_reply(
    content: RecordDict,
    reference: ArrayRecord,
    *,
    allow_other_widths: bool = False,
    max_examples: float = 1e9,
) -> str | None:
    """``None`` when the reply is usable, else one sentence saying why not."""
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        return "the reply has no 'arrays' record"
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord) or "num-examples" not in metrics:
        return "the reply has no 'num-examples' metric"
    count = metrics["num-examples"]
    if not isinstance(count, int | float) or not math.isfinite(count):
        return f"num-examples={count!r} is not a finite number"
    if not 0 < count <= max_examples:
        return (
            f"num-examples={count:g} is not in (0, {max_examples:g}] (the examples "
            "the client reported having)"
        )
    missing = sorted(set(reference) - set(arrays))
    if missing:
        return f"the update lacks tensor {missing[0]!r}"
    extra = sorted(set(arrays) - set(reference))
    if extra:
        return f"the update has an unknown tensor {extra[0]!r}"
    for key, ref in reference.items():
        arr = arrays[key]
        if not allow_other_widths and tuple(arr.shape) != tuple(ref.shape):
            return (
                f"tensor {key!r} has shape {tuple(arr.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if len(arr.shape) != len(ref.shape):
            return (
                f"tensor {key!r} has {len(arr.shape)} dimensions, "
                f"expected {len(ref.shape)}"
            )
        if arr.dtype != ref.dtype:
            return f"tensor {key!r} has dtype {arr.dtype}, expected {ref.dtype}"
        values = array_to_numpy(arr)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"tensor {key!r} contains NaN or Inf"
    return None

"""Server checkpoints: everything needed to continue a run after a crash.

After every round the server writes ``<run>/checkpoint.pt`` atomically (a temp
file then ``os.replace``) before ``results.json``: the round counter, the whole
global state dict (server-owned tensors included) and the build kwargs of the
global model (its widths may have changed), the strategy object itself
(pickled, with its optimiser moments, matching assignments or Fisher
information), the RNG states of the server process, and the round records so
far. ``fedsim run resume=<run>`` loads it and continues with the next round;
the same seed then gives the same final model as an uninterrupted run.

What lives on clients between rounds (their ``context.state``: local-role
tensors such as client-local GEN node positions) is not part of a server
checkpoint; such clients restart from their initial local values.
"""

from __future__ import annotations

import io
import logging
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsim.exceptions import ConfigError
from fedsim.results import atomic_write_bytes

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.pt"
log = logging.getLogger("fedsim")


@dataclass
class Checkpoint:
    """The server's state after a completed round."""

    server_round: int
    global_state: dict[str, torch.Tensor]
    model_name: str
    model_kwargs: dict[str, Any]
    strategy: Any
    rounds: list[dict[str, Any]]
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The server process's Python and torch RNG states (fedsim passes numpy
    generators explicitly and never uses numpy's global one)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    if "python" in states:
        random.setstate(states["python"])
    if "torch" in states:
        torch.set_rng_state(states["torch"])


def _picklable(strategy: Any) -> Any:
    try:
        pickle.dumps(strategy)
    except Exception as err:  # any pickling failure means: cannot checkpoint it
        log.warning(
            "the strategy %s cannot be pickled (%s); a resumed run will start it "
            "afresh",
            type(strategy).__name__,
            err,
        )
        return None
    return strategy


def save_checkpoint(folder: Path, ckpt: Checkpoint) -> None:
    """Write ``folder/checkpoint.pt`` atomically."""
    payload = {
        "server_round": ckpt.server_round,
        "global_state": {k: v.detach().cpu() for k, v in ckpt.global_state.items()},
        "model_name": ckpt.model_name,
        "model_kwargs": ckpt.model_kwargs,
        "strategy": _picklable(ckpt.strategy),
        "rounds": ckpt.rounds,
        "rng": ckpt.rng,
        "extra": ckpt.extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(folder / CHECKPOINT_FILE, buf.getvalue())


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read ``folder/checkpoint.pt``.

    Raises
    ------
    ConfigError
        If the folder holds no checkpoint.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume={str(folder)!r} holds no {CHECKPOINT_FILE}; it is not a fedsim "
            "run folder or no round finished"
        )
    # the file is fedsim's own (it pickles the strategy object), so full load
    data = torch.load(path, weights_only=False)
    return Checkpoint(**data)

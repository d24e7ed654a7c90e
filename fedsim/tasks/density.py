"""Density estimation by maximum likelihood; reports bits per dimension.

The model's output is ``log p(x)`` in nats, one value per example, as
``iresnet_flow`` returns it; labels are ignored, so the clients' data is used
unlabeled. The loss is ``-log p(x)`` per example and the headline metric is
``bpd``, bits per dimension of the discrete data (lower is better):
``bpd = -log p(x) / (D ln 2) + log2(L)`` for ``D`` values per example and ``L``
grey levels.

Where the pixels come from
--------------------------
fedsim's datasets standardise their inputs, and a continuous density of
integer pixels needs dequantisation. fedsim's training step hands the model
the dataset's tensors unchanged (a task sees only the model's output), so the
dataset does it: ``digits`` and ``mnist5k`` take ``dequantize=true`` and then
hold ``(x + u) / L - 1/2`` with ``u`` uniform on [0, 1), drawn once per pixel
from the run seed (:mod:`fedsim.data._dequantize`), in place of standardised
pixels. The density of these values is the density of the dequantised
``(x + u) / L``; its bin probabilities are about ``p / L^D``, hence the
``log2(L)`` above. ``levels`` must equal the dataset's number of grey levels:
256 for 8-bit images such as ``mnist5k``, 17 for ``digits`` (0..16). The task
refuses a dataset that was not dequantised (``dequantized`` mirrors
``dataset.dequantize`` in ``configs/task/density.yaml``).

``D`` is the model's: the server calls :meth:`Density.bind_model` on the
global model once, which reads the model's ``num_dims`` (and refuses a model
that is not a density model). A task that was not bound (a client's federated
evaluation) reports ``nll`` only, ``-log p(x)`` in nats.

In eval mode ``iresnet_flow`` draws its Hutchinson probes from its own fixed
seed, so the server's test bits per dimension are the same on every call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedsim.exceptions import ConfigError
from fedsim.models.iresnet import bits_per_dim
from fedsim.tasks import TASKS

__all__ = ["Density", "density"]


def _log_density(output: torch.Tensor) -> torch.Tensor:
    """``output`` as one log-density per example, shape (batch,)."""
    if output.ndim != 1:
        raise ValueError(
            f"density needs the model to return log p(x) per example, shape "
            f"(batch,), got {tuple(output.shape)}; use a density model such as "
            "iresnet_flow"
        )
    return output


@dataclass(frozen=True)
class Density:
    """Negative log-likelihood training; reports ``bpd`` once bound to a model.

    Parameters
    ----------
    levels : int
        Grey levels ``L`` of the data (256 for 8-bit images).
    num_dims : int or None
        Values per example ``D``, filled in by :meth:`bind_model`.
    """

    levels: int = 256
    num_dims: int | None = None
    primary: str = "bpd"
    higher_is_better: bool = False

    def bind_model(self, model: torch.nn.Module) -> Density:
        """This task, completed with ``model``'s number of dimensions.

        Raises
        ------
        fedsim.exceptions.ConfigError
            If the model declares no positive integer ``num_dims``.
        """
        dims = getattr(model, "num_dims", None)
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            name = getattr(model, "fedsim_name", type(model).__name__)
            raise ConfigError(
                f"task=density needs a density model that returns log p(x) and "
                f"declares num_dims, such as iresnet_flow; model {name!r} does not"
            )
        return dataclasses.replace(self, num_dims=dims)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example ``-log p(x)`` in nats; ``target`` is ignored."""
        return -_log_density(output)

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ``nll`` (nats) and, once bound, ``bpd``."""
        log_p = _log_density(output)
        values = {"nll": -log_p}
        if self.num_dims is not None:
            values["bpd"] = bits_per_dim(log_p, self.num_dims, levels=self.levels)
        return values


@TASKS.register("density")
def density(*, levels: int = 256, dequantized: bool = True) -> Density:
    """Registered ``density`` task.

    Parameters
    ----------
    levels : int
        Grey levels of the data, at least 2: 256 for 8-bit images such as
        ``mnist5k``, 17 for ``digits``.
    dequantized : bool
        Whether the dataset hands out dequantised pixels; the config sets it
        from ``dataset.dequantize``, and ``False`` is refused.

    Raises
    ------
    fedsim.exceptions.ConfigError
        If ``levels`` is below 2 or the data is not dequantised.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ConfigError(
            f"task.levels={levels!r} must be the data's number of grey levels, an "
            "integer >= 2 (256 for 8-bit images, 17 for digits)"
        )
    if not dequantized:
        raise ConfigError(
            "task=density needs dequantised pixels, but dataset.dequantize is "
            "false; set dataset.dequantize=true (digits, mnist5k have it)"
        )
    return Density(levels=levels)
